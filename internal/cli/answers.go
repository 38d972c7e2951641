package cli

import (
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/randid"
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

// checkAnswers is checkAnswer for the replies of one gather, the signed ones first: an
// unsigned reply in the name of a node whose signed reply came after it is refused too.
// errs[i] is nil for a reply that may be taken.
func (f *fleet) checkAnswers(msgs []*nats.Msg, subject, nonce string) (from []answer, errs []error) {
	from, errs = make([]answer, len(msgs)), make([]error, len(msgs))
	for i, m := range msgs {
		from[i], errs[i] = f.verifyAnswer(m, subject, nonce)
	}
	for i := range msgs {
		if errors.Is(errs[i], protocol.ErrUnsignedAnswer) {
			errs[i] = f.checkUnsigned(from[i].node)
		}
	}
	return from, errs
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
