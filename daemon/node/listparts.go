package node

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// maxListBytes bounds what the node holds of one nexlet's answer in parts: about
// 150,000 workloads' rows, far more than a node runs, and a rogue nexlet's parts cost
// the node no more than this a fan-out.
const maxListBytes = 64 << 20

// listParts joins the answers in parts (HeaderListPart) to a QUERYWORKLOADS fan-out,
// by reply token. Its caller serialises add.
type listParts struct {
	byToken map[string]*partialList
}

// partialList is an answer in parts so far: next is the number of the part due, of
// how many.
type partialList struct {
	next, of, size int
	parts          [][]byte
}

// add takes m, a reply on token tok, and returns the answer it completes: m itself if
// it is not in parts, the parts' rows in one JSON array once the last came, or an
// error reply naming what was wrong with them. ok is false while parts are due.
func (l *listParts) add(tok string, m *nats.Msg) (answer *nats.Msg, ok bool) {
	p := l.byToken[tok]
	h := m.Header.Get(protocol.HeaderListPart)
	if h == "" {
		if p != nil {
			return listFailure(m, fmt.Sprintf("an answer in parts broken off after part %d of %d", p.next-1, p.of)), true
		}
		return m, true
	}
	i, n, err := parsePart(h)
	switch {
	case err != nil:
		return listFailure(m, err.Error()), true
	case p == nil && i != 1:
		return listFailure(m, fmt.Sprintf("an answer in parts begun with part %q", h)), true
	case p == nil:
		p = &partialList{next: 1, of: n}
		l.byToken[tok] = p
	case i != p.next || n != p.of:
		return listFailure(m, fmt.Sprintf("part %q of an answer in parts where %d/%d was due", h, p.next, p.of)), true
	}
	p.size += len(m.Data)
	if p.size > maxListBytes {
		return listFailure(m, fmt.Sprintf("an answer in parts of more than %d bytes", maxListBytes)), true
	}
	p.parts = append(p.parts, m.Data)
	p.next++
	if i < n {
		return nil, false
	}
	delete(l.byToken, tok)
	joined, err := joinArrays(p.parts)
	if err != nil {
		return listFailure(m, err.Error()), true
	}
	return &nats.Msg{Subject: m.Subject, Header: m.Header, Data: joined}, true
}

// parsePart reads a HeaderListPart value, "i/n" with 1 <= i <= n.
func parsePart(h string) (i, n int, err error) {
	a, b, found := strings.Cut(h, "/")
	i, err1 := strconv.Atoi(a)
	n, err2 := strconv.Atoi(b)
	if !found || err1 != nil || err2 != nil || i < 1 || i > n {
		return 0, 0, fmt.Errorf("%s %q is not i/n with 1 <= i <= n", protocol.HeaderListPart, h)
	}
	return i, n, nil
}

// joinArrays joins JSON arrays into one with their elements in order; each element is
// decoded later, with the whole answer.
func joinArrays(parts [][]byte) ([]byte, error) {
	size := 2
	for _, p := range parts {
		size += len(p)
	}
	out := make([]byte, 0, size)
	out = append(out, '[')
	for i, p := range parts {
		p = bytes.TrimSpace(p)
		if len(p) < 2 || p[0] != '[' || p[len(p)-1] != ']' {
			return nil, fmt.Errorf("part %d of %d of an answer in parts is not a JSON array", i+1, len(parts))
		}
		inner := bytes.TrimSpace(p[1 : len(p)-1])
		if len(inner) == 0 {
			continue
		}
		if len(out) > 1 {
			out = append(out, ',')
		}
		out = append(out, inner...)
	}
	return append(out, ']'), nil
}

// listFailure is an error reply in place of m, so that the fan-out counts the nexlet's
// answer as failed, with what.
func listFailure(m *nats.Msg, what string) *nats.Msg {
	return &nats.Msg{Subject: m.Subject, Header: nats.Header{
		protocol.HeaderErrorCode: {"502"},
		protocol.HeaderError:     {"the node could not take the list: " + what},
	}}
}
