package node

import (
	"encoding/json"
	"fmt"
	"maps"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/protocol"
)

// signing hands h, for a request that carries a nonce (protocol.HeaderNonce), a
// request whose replies the node signs (protocol.SignAnswer): nexctl then takes a
// node's answer only from that node, not from whoever else sees the request. A
// request without one (upstream's client, an older nexctl) is answered as before.
func (n *Node) signing(h func(micro.Request)) func(micro.Request) {
	return func(r micro.Request) {
		if nonceOf(r) == "" {
			h(r)
			return
		}
		h(&signedRequest{Request: r, n: n})
	}
}

// nonceOf is r's nonce, "" when it carries none or one that is not a nonce.
func nonceOf(r micro.Request) string {
	nonce := r.Headers().Get(protocol.HeaderNonce)
	if nonce == "" || protocol.CheckNonce(nonce) != nil {
		return ""
	}
	return nonce
}

// signReply signs m, a reply to r the node publishes itself (a keep-alive, a progress
// report, the "stopping" word), when r carries a nonce.
func (n *Node) signReply(r micro.Request, m *nats.Msg) {
	nonce := nonceOf(r)
	if nonce == "" {
		return
	}
	if m.Header == nil {
		m.Header = nats.Header{}
	}
	// Numbered under the signature: a keep-alive or progress report is alike each
	// time, and nexctl takes each number once, so a copy of one is not the node heard.
	m.Header.Set(protocol.HeaderSeq, strconv.FormatUint(n.replySeq.Add(1), 10))
	if err := protocol.SignAnswer(n.o.NodeKey, n.id, nonce, r.Subject(), m.Header, m.Data); err != nil {
		n.log.Warn("reply not signed", "subject", r.Subject(), "err", err)
	}
}

// signedRequest is a request whose replies carry the node's signature.
type signedRequest struct {
	micro.Request
	n *Node
}

// unwrapRequest is the request a signedRequest wraps (r itself otherwise).
func unwrapRequest(r micro.Request) micro.Request {
	if s, ok := r.(*signedRequest); ok {
		return s.Request
	}
	return r
}

// signed is the header the reply m (opts applied to it) goes out with, signed.
func (s *signedRequest) signed(m *nats.Msg, opts []micro.RespondOpt) micro.RespondOpt {
	for _, o := range opts {
		o(m)
	}
	if m.Header == nil {
		m.Header = nats.Header{}
	}
	s.n.signReply(s.Request, m)
	h := m.Header
	// Replaces what the wrapped request's own options would set: the header as signed.
	return func(out *nats.Msg) { out.Header = maps.Clone(h) }
}

func (s *signedRequest) Respond(b []byte, opts ...micro.RespondOpt) error {
	return s.Request.Respond(b, s.signed(&nats.Msg{Data: b}, opts))
}

func (s *signedRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("%w: %w", micro.ErrMarshalResponse, err)
	}
	return s.Respond(b, opts...)
}

// Error sends the error reply micro would (its two headers, then opts), signed.
func (s *signedRequest) Error(code, desc string, data []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Data: data, Header: nats.Header{micro.ErrorHeader: {desc}, micro.ErrorCodeHeader: {code}}}
	return s.Request.Error(code, desc, data, s.signed(m, opts))
}
