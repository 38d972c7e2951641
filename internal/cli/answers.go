package cli

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/scatter"
	"github.com/nexd-project/nexd/protocol"
)

// Signed answers. nexctl sends a fresh nonce (protocol.HeaderNonce, from crypto/rand)
// with each request to the nodes; a nexd node signs every reply to it with its node
// key over the nonce, the subject, the headers and the body (protocol.SignAnswer), so
// whoever else sees the request (a rogue node, anyone on an open bus) cannot answer in
// its name, and a copy of an earlier answer does not pass. Upstream nodes (and nexd
// before this) do not sign. What nexctl does with a reply:
//   - signed, and it verifies: the node it names answered (in trusted_nodes, when set);
//   - signed, and it does not verify: refused, with a warning;
//   - unsigned, in the name of a node that signed a bid or an answer in this run (a
//     nexd node): refused as forged;
//   - unsigned otherwise: taken as an upstream node's, as before, and said so where
//     it adds rows (node list, workload list); refused when trusted_nodes is set
//     unless --allow-unsigned-bids (its node id is only a claim);
//   - where nexctl knows which node must answer (a deploy to a signed bid, a stop or a
//     clone of a workload a signing node listed): only that node's signed replies;
//   - a clone whose holder is not known to sign: a signed answer over unsigned ones,
//     and none when two nodes sign one (a made-up node id poses as the holder).

// newNonce is a fresh nonce for one request.
func newNonce() string { return randid.New() }

// answer is who sent a reply: node (verified when signed, else only what the reply
// claims in HeaderNode, "" for none) and whether it was signed.
type answer struct {
	node   string
	signed bool
}

// noteSigner records that node id signed something nexctl verified in this run.
func (f *fleet) noteSigner(id string) {
	if id == "" {
		return
	}
	f.signersMu.Lock()
	defer f.signersMu.Unlock()
	if f.signers == nil {
		f.signers = map[string]bool{}
	}
	f.signers[id] = true
}

// isSigner says whether node id signed a bid or an answer nexctl verified in this run.
func (f *fleet) isSigner(id string) bool {
	f.signersMu.Lock()
	defer f.signersMu.Unlock()
	return id != "" && f.signers[id]
}

// verifyAnswer checks a signed reply m (to a request on subject with nonce): the node
// it names, or why it is refused. A reply without a signature is errUnsigned.
func (f *fleet) verifyAnswer(m *nats.Msg, subject, nonce string) (answer, error) {
	node, err := protocol.VerifyAnswer(nonce, subject, m.Header, m.Data)
	switch {
	case errors.Is(err, protocol.ErrUnsignedAnswer):
		return answer{node: protocol.AnswerNode(m.Header)}, err
	case err != nil:
		return answer{node: protocol.AnswerNode(m.Header)}, fmt.Errorf("answer refused: %w", err)
	case f.trusted != nil && !f.trusted[node]:
		return answer{node: node, signed: true}, fmt.Errorf("answer refused: signed by node %s, which is not in trusted_nodes", node)
	}
	f.noteSigner(node)
	return answer{node: node, signed: true}, nil
}

// checkUnsigned says whether an unsigned reply claiming node may be taken.
func (f *fleet) checkUnsigned(node string) error {
	who := "a node that does not name itself"
	if node != "" {
		who = "node " + node
	}
	switch {
	case node != "" && f.isSigner(node):
		return fmt.Errorf("answer refused: unsigned, in the name of node %s, which signs its answers (someone posing as it)", node)
	case f.trusted != nil && !f.allowUnsigned:
		return fmt.Errorf("answer refused: unsigned (from %s), so it cannot be checked against trusted_nodes (--allow-unsigned-bids accepts upstream nodes' unsigned answers)", who)
	}
	return nil
}

// checkAnswer is verifyAnswer for one reply, then checkUnsigned for an unsigned one.
func (f *fleet) checkAnswer(m *nats.Msg, subject, nonce string) (answer, error) {
	a, err := f.verifyAnswer(m, subject, nonce)
	if errors.Is(err, protocol.ErrUnsignedAnswer) {
		return a, f.checkUnsigned(a.node)
	}
	return a, err
}

// checked holds verifyAnswer's result for the replies a gather checked as they came
// (a list's promises, wpingOpts), so that checkAnswers does not verify them again:
// each check hashes the reply's whole payload. Written by the gather's goroutine only,
// read after it; it holds no more replies than the gather returns (a promise's
// acknowledgements aside, which it does not keep).
type checked map[*nats.Msg]verified

type verified struct {
	a   answer
	err error
}

// checkAnswers is checkAnswer for the replies of one gather, the signed ones first: an
// unsigned reply in the name of a node whose signed reply came after it is refused too.
// Each signed answer is taken once: a copy of one (anyone who reads the inbox can send
// it again, and it verifies: same nonce, same bytes) is refused, so it adds no second
// row (a node listed twice, a workload migrated twice). errs[i] is nil for a reply
// that may be taken. done, when not nil, holds the replies verified already.
func (f *fleet) checkAnswers(msgs []*nats.Msg, subject, nonce string, done checked) (from []answer, errs []error) {
	from, errs = make([]answer, len(msgs)), make([]error, len(msgs))
	taken := map[string]bool{}
	for i, m := range msgs {
		if v, ok := done[m]; ok {
			from[i], errs[i] = v.a, v.err
		} else {
			from[i], errs[i] = f.verifyAnswer(m, subject, nonce)
		}
		if errs[i] != nil {
			continue
		}
		if key := answerKey(from[i], m); taken[key] {
			errs[i] = fmt.Errorf("answer refused: a copy of node %s's signed answer to this request, which was taken already (sent again by someone who read it)", from[i].node)
		} else {
			taken[key] = true
		}
	}
	for i := range msgs {
		if errors.Is(errs[i], protocol.ErrUnsignedAnswer) {
			errs[i] = f.checkUnsigned(from[i].node)
		}
	}
	return from, errs
}

// answerKey is what a verified signed answer m from a is taken once by: its node and
// its signature's bytes. An ed25519 signature is one for one payload (Go's check takes
// only the canonical encoding), and a reply changed but for what the payload reads the
// same (blanks before a header's value) keeps it.
func answerKey(a answer, m *nats.Msg) string {
	sig, _ := base64.StdEncoding.DecodeString(m.Header.Get(protocol.HeaderSig)) // it verified
	return a.node + "\n" + string(sig)
}

// checkNodeAnswer is checkAnswer for a reply to a request on node id's own subject
// (INFO, LAMEDUCK): the answer is id's, so one signed by another node is refused, and
// an unsigned one is taken as a claim of id's (and refused for one that names another).
func (f *fleet) checkNodeAnswer(m *nats.Msg, subject, nonce, id string) (answer, error) {
	a, err := f.verifyAnswer(m, subject, nonce)
	switch {
	case errors.Is(err, protocol.ErrUnsignedAnswer) && a.node != "" && a.node != id:
		return a, fmt.Errorf("answer refused: unsigned, in the name of node %s, not of node %s, which was asked", a.node, id)
	case errors.Is(err, protocol.ErrUnsignedAnswer):
		return a, f.checkUnsigned(id)
	case err == nil && a.node != id:
		return a, fmt.Errorf("answer refused: signed by node %s, not by node %s, which was asked", a.node, id)
	}
	return a, err
}

// refusals counts the replies to one request that were refused, for one warning that
// names the first one's reason.
type refusals struct {
	n     int
	first error
}

func (r *refusals) add(err error) {
	if r.n++; r.first == nil {
		r.first = err
	}
}

// warn tells f's user how many replies to what (the request) were ignored, if any.
func (r *refusals) warn(f *fleet, what string) {
	if r.n > 0 && f.warn != nil {
		f.warn("ignored %d repl(ies) to %s: %v", r.n, what, r.first)
	}
}

// askNode sends v on subject, node id's own (INFO, LAMEDUCK), with a fresh nonce and
// head's headers, to inbox ("" for a new one; a caller that reads it too subscribes
// first), and takes id's answer as a gather takes a row: one signed by id at once; an
// unsigned one (an upstream node's, an older nexd's, or anyone's posing as one) when
// checkUnsigned allows it for id and nothing id signed came within f.stall after it,
// noted once as not verified (noteUnsigned); every other reply is refused and warned
// of. So whoever else sees the request (a rogue node, anyone on an open bus) does not
// answer in a nexd node's name. ok is false when nobody listens: the server's "no
// responders", which carries no signature and anyone can write; where an unsigned
// reply in id's name is refused it counts only once nothing id signed came within
// f.first (a node gone away looks so; a node that answers is not made absent). A node
// error answer is returned with its error, as request does.
func (f *fleet) askNode(ctx context.Context, id, subject string, v any, head nats.Header, inbox, what string) (m *nats.Msg, ok bool, err error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, true, err
	}
	if inbox == "" {
		inbox = f.nc.NewInbox()
	}
	before := f.nc.LastError()
	sub, err := scatter.Subscribe(f.nc, inbox)
	if err != nil {
		return nil, true, fmt.Errorf("subscribe for the reply on %s: %w", subject, err)
	}
	defer sub.Close()
	nonce := newNonce()
	h := nats.Header{protocol.HeaderNonce: {nonce}}
	for k, vs := range head {
		h[k] = vs
	}
	sent := time.Now()
	if err := f.nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: data, Header: h}); err != nil {
		return nil, true, fmt.Errorf("publish %s: %w", subject, err)
	}
	if err := scatter.FlushRefused(ctx, f.nc, before, f.first, subject, inbox); err != nil {
		return nil, true, err
	}
	var refused refusals
	defer refused.warn(f, what)
	var held *nats.Msg // an unsigned reply, taken unless id's signed one comes
	heldUntil := time.Time{}
	nobody := false // a "no responders" came, refused: the node's absence, or forged
	deadline := sent.Add(f.first)
	for {
		until := deadline
		if held != nil {
			until = earliest(until, heldUntil)
		}
		rctx, cancel := context.WithDeadline(ctx, until)
		r, err := sub.Next(rctx)
		cancel()
		switch {
		case err != nil && ctx.Err() != nil:
			return nil, true, ctx.Err()
		case errors.Is(err, scatter.ErrClosed):
			return nil, true, f.closedLink("the answer on "+subject, sent)
		case err != nil && held != nil:
			if scatter.NoResponders(held) {
				return nil, false, nil
			}
			f.noteUnsigned(what, id)
			return held, true, replyError(held)
		case err != nil && nobody:
			return nil, false, nil
		case err != nil:
			return nil, true, fmt.Errorf("no reply on %s within %s%s: %w", subject, f.first, droppedNote(sub), nats.ErrTimeout)
		}
		a, cerr := f.checkNodeAnswer(r, subject, nonce, id)
		switch {
		case cerr != nil && scatter.NoResponders(r):
			nobody = true // told only if the node answers after all
		case cerr != nil:
			refused.add(cerr)
		case a.signed:
			// What came before it was not the server's nor id's: id answers, and signs.
			forgedNobody := fmt.Errorf("answer refused: a \"no responders\" status, while node %s answered (someone posing as the server)", id)
			if nobody {
				refused.add(forgedNobody)
			}
			switch {
			case held != nil && scatter.NoResponders(held):
				refused.add(forgedNobody)
			case held != nil:
				refused.add(fmt.Errorf("answer refused: unsigned, in the name of node %s, which signs its answers (someone posing as it)", id))
			}
			return r, true, replyError(r)
		case held != nil:
			refused.add(fmt.Errorf("answer refused: unsigned, in the name of node %s, after another such answer was taken", id))
		default:
			held, heldUntil = r, time.Now().Add(f.stall)
		}
	}
}

// noteUnsigned says once per run that node id's answer to what came unsigned.
func (f *fleet) noteUnsigned(what, id string) {
	f.signersMu.Lock()
	if f.noted == nil {
		f.noted = map[string]bool{}
	}
	seen := f.noted[id]
	f.noted[id] = true
	f.signersMu.Unlock()
	if !seen && f.warn != nil {
		f.warn("%v", (*unsignedRows)(nil).add("answer(s) to "+what, id, 1))
	}
}

// unsignedRows notes rows taken from replies no node signed (upstream nodes, nexd
// before signed answers, or anyone on the bus posing as one): shown, not verified.
type unsignedRows struct {
	what  string   // "node list rows", "workload rows"
	nodes []string // the node ids they claim ("" for none)
	rows  int
}

func (u *unsignedRows) Error() string {
	return fmt.Sprintf("note: %d %s came in answers no node signed (upstream nodes and older nexd nodes do not sign; anyone on the bus can pose as one), so they are not verified%s; list your nodes in trusted_nodes to refuse such answers",
		u.rows, u.what, claimed(u.nodes))
}

// add notes rows more, from an unsigned answer claiming node ("" for none): u, or a
// new note of what when u is nil.
func (u *unsignedRows) add(what, node string, rows int) *unsignedRows {
	if u == nil {
		u = &unsignedRows{what: what}
	}
	u.rows += rows
	u.nodes = append(u.nodes, node)
	return u
}

func claimed(nodes []string) string {
	var named []string
	for _, n := range nodes {
		if n != "" {
			named = append(named, n)
		}
	}
	if len(named) == 0 {
		return ""
	}
	return fmt.Sprintf(" (claiming node(s) %v)", named)
}
