package node

import (
	"encoding/json"
	"errors"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/protocol"
)

// internalErrorText replaces the text of every 5xx reply; the full error is logged
// under the same error_id.
const internalErrorText = "internal server error"

// fail replies with a micro error: headers Nats-Service-Error-Code and
// Nats-Service-Error, body {"error_id","error"}. what is a short description that is
// safe to show; for 4xx the body carries err's full text, for 5xx it is redacted.
func (n *Node) fail(r micro.Request, code int, what string, err error, opts ...micro.RespondOpt) {
	id := randid.New()
	text := err.Error()
	if code >= 500 {
		n.log.Error(what, "err", err, "error_id", id, "subject", r.Subject())
		text = internalErrorText
		var pe *publicError
		if errors.As(err, &pe) {
			text = pe.public + " (error_id " + id + " in the node's log)"
		}
	} else {
		n.log.Debug(what, "err", err, "error_id", id, "subject", r.Subject(), "code", code)
	}
	body, _ := json.Marshal(protocol.ErrorBody{ErrorID: id, Error: text})
	desc := headerSafe(what)
	if code < 500 {
		desc = headerSafe(text)
	}
	if rerr := r.Error(strconv.Itoa(code), desc, body, opts...); rerr != nil {
		n.log.Warn("failed to send error reply", "err", rerr, "error_id", id)
	}
}

// publicError is a 5xx cause whose public text may be shown to any caller: it says
// what failed, not the details (those are logged).
type publicError struct {
	public string
	err    error
}

func (e *publicError) Error() string { return e.err.Error() }
func (e *publicError) Unwrap() error { return e.err }

// headerSafe keeps a header value on one line and of modest size (validation errors
// are multi-line and a raw newline would break the NATS protocol).
func headerSafe(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 512 {
		s = s[:509] + "..."
	}
	if s == "" {
		s = "error"
	}
	return s
}

// respondJSON sends v, logging a failed send (the requester is gone).
func (n *Node) respondJSON(r micro.Request, v any) {
	if err := r.RespondJSON(v); err != nil {
		n.log.Warn("failed to send reply", "subject", r.Subject(), "err", err)
	}
}

// isErrorReply reports whether a nexlet's reply carries a micro error header.
func isErrorReply(m *nats.Msg) bool {
	return m.Header != nil && m.Header.Get(protocol.HeaderErrorCode) != ""
}

// refuse is fail for a deploy that started nothing: the reply says so, and a client
// may try another bid.
func (n *Node) refuse(r micro.Request, code int, what string, err error) {
	n.fail(r, code, what, err, notStarted())
}

func notStarted() micro.RespondOpt {
	return micro.WithHeaders(micro.Headers{protocol.HeaderDeployOutcome: {protocol.DeployNotStarted}})
}
