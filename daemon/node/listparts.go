package node

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// maxListBytes bounds what the node holds of one nexlet's answer in parts: about
// 150,000 workloads' rows, far more than a node runs.
const maxListBytes = 64 << 20

// defaultListMemory is Options.ListMemory's default: four nexlets' whole shares.
const defaultListMemory = 4 * maxListBytes

// listBudget bounds what the node holds of its nexlets' answers to QUERYWORKLOADS
// across all its fan-outs at once (each WPING, control socket list, drain and status
// count is one): the bound per answer alone let N lists at once hold N times it, and
// a rogue nexlet answering each with 64 MiB of parts grew the node by 64 MiB a list
// (TestAttackRogueNexletListMemory). A nexlet's answers together may hold a quarter of
// the whole (its share, which also bounds one answer), so that a rogue nexlet does not
// take what the other nexlets' answers need. The answers to tenant namespaces' lists
// together may hold half of a nexlet's share and half of the whole, one namespace's a
// quarter of the share: the other half of each is kept for the system namespace's
// lists (the drain's, a shutdown's stop-all, the replay's, the control socket's), which
// however many tenants flood their lists still get each nexlet's answer
// (TestAttackTenantFloodsStarveSystemList), and one tenant's flood does not take what
// the other tenants' lists need.
type listBudget struct {
	total, share        int64
	tenants, tenantsAll int64 // tenant namespaces' answers together: of one nexlet, of all
	nsShare             int64 // one tenant namespace's answers of one nexlet
	log                 *slog.Logger
	warned              rateLog

	mu         sync.Mutex
	held       int64
	heldTenant int64 // of held, answers to tenant namespaces' lists
	byNexlet   map[string]int64
	byTenants  map[string]int64 // by nexlet, its answers to tenant namespaces' lists
	byNS       map[nexletNS]int64
	refused    atomic.Uint64 // answers refused for want of budget
	maxHeldAt  atomic.Int64  // the most held at once since the start
}

type nexletNS struct{ nexlet, ns string }

func newListBudget(total int64, log *slog.Logger) *listBudget {
	share := min(total/4, maxListBytes)
	return &listBudget{total: total, share: share, tenants: share / 2, tenantsAll: total / 2, nsShare: share / 4, log: log,
		byNexlet: map[string]int64{}, byTenants: map[string]int64{}, byNS: map[nexletNS]int64{}}
}

// take charges size bytes of nexlet's answer to a list of namespace ns, or says why
// it cannot.
func (b *listBudget) take(nexlet, ns string, size int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	k := nexletNS{nexlet, ns}
	tenant := ns != protocol.SystemNamespace
	var err error
	switch {
	case b.byNexlet[nexlet]+size > b.share:
		err = fmt.Errorf("this nexlet's answers to the lists under way would hold more than %d bytes of the node's memory at once, its share", b.share)
	case tenant && b.byNS[k]+size > b.nsShare:
		err = fmt.Errorf("this nexlet's answers to the lists of namespace %s under way would hold more than %d bytes of the node's memory at once, a quarter of its share", ns, b.nsShare)
	case tenant && b.byTenants[nexlet]+size > b.tenants:
		err = fmt.Errorf("this nexlet's answers to the tenant namespaces' lists under way would hold more than %d bytes of the node's memory at once, half its share (the rest is the system namespace's)", b.tenants)
	case tenant && b.heldTenant+size > b.tenantsAll:
		err = fmt.Errorf("the answers to the tenant namespaces' lists under way would hold more than %d bytes of the node's memory at once, half its bound for lists (the rest is the system namespace's)", b.tenantsAll)
	case b.held+size > b.total:
		err = fmt.Errorf("the answers to the lists under way would hold more than %d bytes of the node's memory at once, its bound for lists", b.total)
	}
	if err != nil {
		return err
	}
	b.held += size
	b.byNexlet[nexlet] += size
	b.byNS[k] += size
	if tenant {
		b.heldTenant += size
		b.byTenants[nexlet] += size
	}
	if b.held > b.maxHeldAt.Load() {
		b.maxHeldAt.Store(b.held)
	}
	return nil
}

// give returns what take charged.
func (b *listBudget) give(nexlet, ns string, size int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	k := nexletNS{nexlet, ns}
	b.held -= size
	if b.byNexlet[nexlet] -= size; b.byNexlet[nexlet] <= 0 {
		delete(b.byNexlet, nexlet)
	}
	if b.byNS[k] -= size; b.byNS[k] <= 0 {
		delete(b.byNS, k)
	}
	if ns != protocol.SystemNamespace {
		b.heldTenant -= size
		if b.byTenants[nexlet] -= size; b.byTenants[nexlet] <= 0 {
			delete(b.byTenants, nexlet)
		}
	}
}

// refuse counts and logs (at most once a minute) an answer refused for want of budget.
func (b *listBudget) refuse(nexlet, ns string, err error) {
	total := b.refused.Add(1)
	if ok, held := b.warned.allow(time.Now(), time.Minute); ok && b.log != nil {
		b.log.Warn("a nexlet's list answer refused: the node's memory for lists under way is taken; the list says it lacks that nexlet",
			"agent_id", nexlet, "namespace", ns, "err", err, "refused", held+1, "refused_total", total)
	}
}

// ListAnswersRefused counts the nexlets' list answers the node refused because its
// memory for the answers of the lists under way (Options.ListMemory) was taken.
func (n *Node) ListAnswersRefused() uint64 { return n.lists.refused.Load() }

// heldBy is what nexlet's answers hold now.
func (b *listBudget) heldBy(nexlet string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.byNexlet[nexlet]
}

// listParts joins the answers in parts (HeaderListPart) to a QUERYWORKLOADS fan-out,
// by reply token, and charges each nexlet's answer, part by part, to the node's
// budget (nil: none), which gets it back when the answer fails or at release. Its
// caller serialises add and release.
type listParts struct {
	byToken map[string]*partialList
	budget  *listBudget
	ns      string            // the list's namespace
	from    map[string]string // reply token -> the agent id it was given to
	charged map[string]int64  // reply token -> bytes taken from budget
	closed  bool              // released: the fan-out is over
}

// newListParts joins the answers of a list of namespace ns, charged to budget; from
// names the nexlet each reply token went to.
func newListParts(budget *listBudget, ns string, from map[string]string) *listParts {
	return &listParts{byToken: map[string]*partialList{}, budget: budget, ns: ns, from: from, charged: map[string]int64{}}
}

// release gives back what the fan-out's answers hold: they are handed on or dropped.
// An add after it is refused (a callback still running as the fan-out ended).
func (l *listParts) release() {
	l.closed = true
	for tok := range l.charged {
		l.giveBack(tok)
	}
}

func (l *listParts) giveBack(tok string) {
	if n := l.charged[tok]; n > 0 && l.budget != nil {
		l.budget.give(l.from[tok], l.ns, n)
	}
	delete(l.charged, tok)
}

// charge takes m's bytes for tok's answer from the budget.
func (l *listParts) charge(tok string, m *nats.Msg) error {
	if l.budget == nil {
		return nil
	}
	size := int64(len(m.Data))
	if err := l.budget.take(l.from[tok], l.ns, size); err != nil {
		l.budget.refuse(l.from[tok], l.ns, err)
		return err
	}
	if l.charged == nil {
		l.charged = map[string]int64{}
	}
	l.charged[tok] += size
	return nil
}

// fail ends tok's answer as an error: its parts are dropped and their budget given back.
func (l *listParts) fail(tok string, m *nats.Msg, what string) (*nats.Msg, bool) {
	delete(l.byToken, tok)
	l.giveBack(tok)
	return listFailure(m, what), true
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
	if l.closed {
		return l.fail(tok, m, "the list was over")
	}
	p := l.byToken[tok]
	h := m.Header.Get(protocol.HeaderListPart)
	if h == "" {
		if p != nil {
			return l.fail(tok, m, fmt.Sprintf("an answer in parts broken off after part %d of %d", p.next-1, p.of))
		}
		if err := l.charge(tok, m); err != nil {
			return l.fail(tok, m, err.Error())
		}
		return m, true
	}
	i, n, err := parsePart(h)
	switch {
	case err != nil:
		return l.fail(tok, m, err.Error())
	case p == nil && i != 1:
		return l.fail(tok, m, fmt.Sprintf("an answer in parts begun with part %q", h))
	case p == nil:
		p = &partialList{next: 1, of: n}
		l.byToken[tok] = p
	case i != p.next || n != p.of:
		return l.fail(tok, m, fmt.Sprintf("part %q of an answer in parts where %d/%d was due", h, p.next, p.of))
	}
	p.size += len(m.Data)
	if p.size > maxListBytes {
		return l.fail(tok, m, fmt.Sprintf("an answer in parts of more than %d bytes", maxListBytes))
	}
	if err := l.charge(tok, m); err != nil {
		return l.fail(tok, m, err.Error())
	}
	p.parts = append(p.parts, m.Data)
	p.next++
	if i < n {
		return nil, false
	}
	delete(l.byToken, tok)
	joined, err := joinArrays(p.parts)
	if err != nil {
		return l.fail(tok, m, err.Error())
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
// decoded later, with the whole answer. Each part is checked to be JSON: before, only
// its brackets were, so the parts `["a]` and `[b"]` made `["a,b"]`, a row neither
// part had, and a part cut short failed only the whole answer's decode, which did
// not say which part it was (FuzzListPartsJoin).
func joinArrays(parts [][]byte) ([]byte, error) {
	const jsonBlanks = " \t\r\n"
	size := 2
	for _, p := range parts {
		size += len(p)
	}
	out := make([]byte, 0, size)
	out = append(out, '[')
	for i, p := range parts {
		// JSON's own blanks only: bytes.TrimSpace also strips \v, \f and Unicode
		// spaces, which took "\v[0]" for an array and blamed the next part.
		p = bytes.Trim(p, jsonBlanks)
		if len(p) < 2 || p[0] != '[' || p[len(p)-1] != ']' || !json.Valid(p) {
			return nil, fmt.Errorf("part %d of %d of an answer in parts is not a JSON array", i+1, len(parts))
		}
		inner := bytes.Trim(p[1:len(p)-1], jsonBlanks)
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
