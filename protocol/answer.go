package protocol

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/textproto"
	"slices"
	"strings"

	"github.com/nats-io/nkeys"
)

// Signed answers (a nexd extension). A client that sends HeaderNonce (a fresh random
// value, CheckNonce) on a control request gets every reply a nexd node sends it for
// that request (answer, error, progress, keep-alive, the "stopping" word, a list's
// acknowledgement) with HeaderNode, the node id, and HeaderSig, the node's signature
// with its server nkey (whose public key is the node id) over AnswerPayload: the
// node id, the nonce, the request's subject, every other header of the reply and its
// body. So nobody else who sees the request (a rogue node, anyone on an open bus) can
// answer in a nexd node's name, and a copy of an earlier answer does not pass for this
// one. Upstream nodes ignore the header and answer unsigned; upstream clients never
// send it and get unsigned answers, as from upstream's node.
const (
	HeaderNonce = "Nex-Nonce"
	HeaderSig   = "Nex-Sig"
	// HeaderSeq numbers a nexd node's signed replies (unique in the node's run), under
	// the signature: a body-less keep-alive or progress report is alike each time, and
	// its number is what tells the node's next one from a copy of the last (anyone who
	// reads the inbox can send one again, and it verifies). Older nexd nodes do not
	// send it.
	HeaderSeq = "Nex-Seq"
)

// MaxNonce bounds HeaderNonce's value.
const MaxNonce = 64

// ErrUnsignedAnswer marks a reply without HeaderSig: an upstream node's, an older
// nexd's, or anyone's posing as one.
var ErrUnsignedAnswer = errors.New("answer is not signed")

// CheckNonce says whether s may be a HeaderNonce value: 1 to 64 letters, digits, '-'
// or '_'.
func CheckNonce(s string) error {
	if s == "" || len(s) > MaxNonce {
		return fmt.Errorf("%s %q: want 1 to %d characters", HeaderNonce, s, MaxNonce)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return fmt.Errorf("%s %q: only letters, digits, '-' and '_' are allowed", HeaderNonce, s)
		}
	}
	return nil
}

// AnswerPayload is what a node signs in an answer: a version line, its id, the
// client's nonce, the request's subject, each header but HeaderSig as "key:value"
// lines (keys sorted, values in order as they arrive: appendWireValue; keys hold no ':' nor
// a newline, or nats.go does not send them), an empty line and the body.
func AnswerPayload(nodeID, nonce, subject string, header map[string][]string, data []byte) []byte {
	keys := make([]string, 0, len(header))
	size := len("nexd-answer/1\n") + len(nodeID) + len(nonce) + len(subject) + 4 + len(data)
	for k, vs := range header {
		if k == HeaderSig {
			continue
		}
		keys = append(keys, k)
		for _, v := range vs {
			size += len(k) + len(v) + 2
		}
	}
	slices.Sort(keys)
	b := make([]byte, 0, size)
	b = append(b, "nexd-answer/1\n"...)
	b = append(b, nodeID...)
	b = append(b, '\n')
	b = append(b, nonce...)
	b = append(b, '\n')
	b = append(b, subject...)
	b = append(b, '\n')
	for _, k := range keys {
		for _, v := range header[k] {
			b = append(b, k...)
			b = append(b, ':')
			b = appendWireValue(b, v)
			b = append(b, '\n')
		}
	}
	b = append(b, '\n')
	return append(b, data...)
}

// appendWireValue appends header value v to b as the other end reads it: nats.go sends
// it with the blanks and line ends around it trimmed and each line end within it made a
// blank, and reads it without leading blanks. Before, only leading blanks were
// trimmed, so a node's answer with a value that ended in a blank or held a line end
// was refused as forged (internal/cli FuzzSignedAnswers); for every other value the
// payload is as before, so older nodes' and clients' signatures still verify.
func appendWireValue(b []byte, v string) []byte {
	for _, c := range []byte(textproto.TrimString(v)) {
		if c == '\r' || c == '\n' {
			c = ' '
		}
		b = append(b, c)
	}
	return b
}

// SignAnswer sets header's HeaderNode to nodeID and its HeaderSig to kp's signature
// over the answer (AnswerPayload). header must not be nil.
func SignAnswer(kp nkeys.KeyPair, nodeID, nonce, subject string, header map[string][]string, data []byte) error {
	header[HeaderNode] = []string{nodeID}
	delete(header, HeaderSig)
	sig, err := kp.Sign(AnswerPayload(nodeID, nonce, subject, header, data))
	if err != nil {
		return fmt.Errorf("sign answer: %w", err)
	}
	header[HeaderSig] = []string{base64.StdEncoding.EncodeToString(sig)}
	return nil
}

// VerifyAnswer checks that a reply (header, data) to a request on subject that carried
// nonce was signed by the node it names (HeaderNode) and returns that node's id;
// ErrUnsignedAnswer when it carries no signature.
func VerifyAnswer(nonce, subject string, header map[string][]string, data []byte) (string, error) {
	sigs := header[HeaderSig]
	if len(sigs) == 0 {
		return "", ErrUnsignedAnswer
	}
	nodes := header[HeaderNode]
	if len(sigs) != 1 || len(nodes) != 1 {
		return "", fmt.Errorf("answer has %d signature(s) and names %d node(s): want one of each", len(sigs), len(nodes))
	}
	node := nodes[0]
	if !nkeys.IsValidPublicServerKey(node) {
		return "", fmt.Errorf("answer names node %q, which is not a server nkey", node)
	}
	sig, err := base64.StdEncoding.DecodeString(sigs[0])
	if err != nil {
		return "", fmt.Errorf("answer signature is not base64: %w", err)
	}
	kp, err := nkeys.FromPublicKey(node)
	if err != nil {
		return "", fmt.Errorf("answer node id %q: %w", node, err)
	}
	if err := kp.Verify(AnswerPayload(node, nonce, subject, header, data), sig); err != nil {
		return "", fmt.Errorf("answer signature does not verify with node id %s (forged, or for another request)", node)
	}
	return node, nil
}

// AnswerNode is the node a reply names (HeaderNode), whether or not it is signed.
func AnswerNode(header map[string][]string) string {
	if vs := header[HeaderNode]; len(vs) > 0 {
		return strings.TrimSpace(vs[0])
	}
	return ""
}
