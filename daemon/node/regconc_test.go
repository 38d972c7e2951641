package node

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// overlapStore is the node's state bucket (real JetStream) counting its reads by type
// (a registration's) in flight at once, in all and per type. Each read first waits
// until another is in flight, or for pairWait: reads the node serves at once are then
// seen to overlap however the scheduler runs them, and reads it serves one at a time
// never do.
type overlapStore struct {
	*state.KV
	pairWait  time.Duration
	mu        sync.Mutex
	now       int
	peak      int
	byType    map[string]int
	typePeak  int
	paired    chan struct{} // closed once two reads were in flight at once
	wasPaired bool
}

func (s *overlapStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	s.mu.Lock()
	s.now++
	s.byType[typ]++
	s.peak, s.typePeak = max(s.peak, s.now), max(s.typePeak, s.byType[typ])
	if s.now == 2 && !s.wasPaired {
		s.wasPaired = true
		close(s.paired)
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.now--
		s.byType[typ]--
		s.mu.Unlock()
	}()
	select {
	case <-s.paired:
	case <-time.After(s.pairWait):
	}
	return s.KV.ByType(ctx, typ)
}

func (s *overlapStore) peaks() (all, perType int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak, s.typePeak
}

// TestRegistrationsServedAtOnceWhileStateUnreadable (fault: the server's JetStream
// off, so every read of the node's state bucket waits out the JetStream API's timeout):
// four supervised nexlets of four types each register twice at once, as nexlets
// restarting in an outage do. Every registration is refused 503 (state unreadable);
// the node read the state for more than one of them at once, but never for two of one
// type (nor of one nexlet) at once. Before, the endpoint served one registration at a
// time: the reads never overlapped, and the eight refusals took eight read timeouts.
func TestRegistrationsServedAtOnceWhileStateUnreadable(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{})
	var st *overlapStore
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) {
		pub, _ := o.NodeKey.PublicKey()
		kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv), pub, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		st = &overlapStore{KV: kv, pairWait: 2 * time.Second, byType: map[string]int{}, paired: make(chan struct{})}
		o.Store = st
	})
	n := f.nodes[0]
	const nexlets, each = 4, 2
	var agents []*fakeAgent
	for i := range nexlets {
		id, name := fmt.Sprintf("agent%d", i), fmt.Sprintf("nexlet%d", i)
		n.ExpectAgent(id, name)
		agents = append(agents, newFakeAgent(t, srv, n.ID(), id, name, fmt.Sprintf("type%d", i)))
	}
	if err := srv.DisableJetStream(); err != nil {
		t.Fatal(err)
	}

	began := time.Now()
	codes := make(chan string, nexlets*each)
	var wg sync.WaitGroup
	for _, a := range agents {
		for range each {
			wg.Go(func() {
				msg := nats.NewMsg(protocol.RegisterSubject(n.ID(), a.id))
				msg.Data = mustJSON(t, a.req)
				// Far past eight read timeouts one after another: the count of answers,
				// not the time, is what passes or fails.
				m, err := a.nc.RequestMsg(msg, 3*time.Minute)
				if err != nil {
					codes <- "no answer: " + err.Error()
					return
				}
				codes <- m.Header.Get(protocol.HeaderErrorCode) + " " + m.Header.Get(protocol.HeaderError)
			})
		}
	}
	wg.Wait()
	close(codes)
	refused := 0
	for c := range codes {
		if c != "503 "+protocol.ErrTextStateUnreadable {
			t.Errorf("registration while the state bucket is unreadable answered %q, want 503 %q", c, protocol.ErrTextStateUnreadable)
			continue
		}
		refused++
	}
	all, perType := st.peaks()
	t.Logf("%d registrations of %d nexlets refused 503 in %v; state reads in flight at once: %d at most, %d of one type",
		refused, nexlets, time.Since(began).Round(time.Millisecond), all, perType)
	if all < 2 {
		t.Errorf("the node read its state for one registration at a time (%d at once at most): the %d registrations were served one after another", all, nexlets*each)
	}
	if perType != 1 {
		t.Errorf("the node read its state for %d registrations of one type at once; want them one at a time", perType)
	}
	if got := n.Agents(); len(got) != 0 {
		t.Errorf("registered while node state is unreadable: %+v", got)
	}
}

// holdStore is the node's state (MemStore) whose first read by type typ waits, after
// saying so on entered, until release: a registration of that type held in its read
// while others run alongside.
type holdStore struct {
	*MemStore
	typ     string
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (s *holdStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	if typ == s.typ {
		first := false
		s.once.Do(func() { first = true })
		if first {
			close(s.entered)
			select {
			case <-s.release:
			case <-ctx.Done():
			}
		}
	}
	return s.MemStore.ByType(ctx, typ)
}

// TestRefusedRegistrationClaimsNoRecord: a registration refused where it commits
// (its name taken meanwhile by a nexlet of another type registering alongside) hands
// back nothing and claims nothing: the record without an owner (an older nexd's) that
// its read found still goes to the next nexlet of its type. Before, the refused one
// had already marked the record its own before the final check, so the next nexlet
// of the type was not handed it: the workload was never started again.
func TestRefusedRegistrationClaimsNoRecord(t *testing.T) {
	var hs *holdStore
	f := newFixture(t, 1, func(_ int, o *Options) {
		hs = &holdStore{MemStore: o.Store.(*MemStore), typ: "typea", entered: make(chan struct{}), release: make(chan struct{})}
		o.Store = hs
	})
	n := f.nodes[0]
	rec := startReq("tenant", "w1", `{}`)
	rec.WorkloadType = "typea" // no Owner: an older nexd's record
	if err := f.stores[0].Put(t.Context(), "typea", "w1", rec); err != nil {
		t.Fatal(err)
	}
	n.ExpectAgent("agentp", "pa")
	n.ExpectAgent("agentq", "qa")
	n.ExpectAgent("agentr", "ra")
	p := newFakeAgent(t, f.srv, n.ID(), "agentp", "dup", "typea")
	q := newFakeAgent(t, f.srv, n.ID(), "agentq", "dup", "typeb")

	answered := make(chan *nats.Msg, 1)
	var wg sync.WaitGroup
	wg.Go(func() {
		msg := nats.NewMsg(protocol.RegisterSubject(n.ID(), p.id))
		msg.Data = mustJSON(t, p.req)
		m, err := p.nc.RequestMsg(msg, time.Minute)
		if err != nil {
			m = &nats.Msg{Header: nats.Header{protocol.HeaderError: {err.Error()}}}
		}
		answered <- m
	})
	defer wg.Wait()
	<-hs.entered // p's registration reads the state of typea
	q.mustRegister()
	close(hs.release)
	m := <-answered
	if code := m.Header.Get(protocol.HeaderErrorCode); code == "" {
		t.Fatalf("registration of agentp under the name agentq took meanwhile was not refused: %s", m.Data)
	}
	r := newFakeAgent(t, f.srv, n.ID(), "agentr", "ra", "typea")
	r.mustRegister()
	if _, ok := r.resp.ExistingState["w1"]; !ok {
		t.Errorf("the record without an owner was not handed to the next nexlet of its type (replayed %d): the refused registration claimed it", len(r.resp.ExistingState))
	}
}
