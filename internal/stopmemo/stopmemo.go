// Package stopmemo remembers recently stopped workloads, bounded in count and age, so
// that a repeated stop (an operator retrying after a timeout) is answered "already
// stopped at T" instead of "not found" as if the id never existed. nexd's node and the
// native nexlet each keep one.
package stopmemo

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// Defaults: an hour, at most 1024 ids (under 200 KB).
const (
	DefaultMax = 1024
	DefaultAge = time.Hour
)

// Entry is one stopped workload.
type Entry struct {
	Namespace string // the workload's; "" when unknown (then only system sees it)
	Name      string // the workload's name; "" when unknown
	Type      string // its workload type
	How       string // the stop's answer: how it ended
	At        time.Time
	// Seq orders the stop among those of its memo's owner when it numbers them (the
	// native nexlet: nexlet.ReplayGuard); 0 otherwise.
	Seq uint64
}

// Memo is safe for concurrent use. The zero value is not; use New.
type Memo struct {
	mu    sync.Mutex
	max   int
	age   time.Duration
	m     map[string]Entry
	order []string // ids, oldest first
}

// New returns a memo that keeps at most max ids for at most age each.
func New(max int, age time.Duration) *Memo {
	return &Memo{max: max, age: age, m: map[string]Entry{}}
}

// Add remembers that id stopped and returns the ids it forgot to make room (past the
// memo's count or age), for a caller that keeps a copy elsewhere.
func (s *Memo) Add(id string, e Entry) (dropped []string) {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.m[id]; ok { // stopped again (rare): its old place goes
		s.order = slices.DeleteFunc(s.order, func(o string) bool { return o == id })
	}
	s.m[id] = e
	s.order = append(s.order, id)
	drop := 0
	for drop < len(s.order) && (len(s.order)-drop > s.max || e.At.Sub(s.m[s.order[drop]].At) > s.age) {
		delete(s.m, s.order[drop])
		drop++
	}
	if drop > 0 {
		dropped = slices.Clone(s.order[:drop])
	}
	s.order = append(s.order[:0], s.order[drop:]...)
	return dropped
}

// IDs lists the ids remembered as stopped within the memo's age, oldest first.
func (s *Memo) IDs(now time.Time) []string {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, id := range s.order {
		if now.Sub(s.m[id].At) <= s.age {
			out = append(out, id)
		}
	}
	return out
}

// Get returns id's entry when it stopped within the memo's age and the caller in
// namespace ns may see it: system sees every workload, another namespace only its own.
func (s *Memo) Get(id, ns string, now time.Time) (Entry, bool) {
	if s == nil {
		return Entry{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.m[id]
	if !ok || !e.visible(ns, now, s.age) {
		return Entry{}, false
	}
	return e, true
}

func (e Entry) visible(ns string, now time.Time, age time.Duration) bool {
	return now.Sub(e.At) <= age && (ns == protocol.SystemNamespace || ns == e.Namespace)
}

// Match is a remembered stop that a reference names.
type Match struct {
	ID string
	Entry
}

// Find returns, newest first and at most max, the entries the caller in namespace ns
// may see (as Get) whose id is ref, whose name is ref, or whose id starts with ref:
// a repeated stop by name or id prefix.
func (s *Memo) Find(ref, ns string, now time.Time, max int) []Match {
	if s == nil || ref == "" {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Match
	for i := len(s.order) - 1; i >= 0 && len(out) < max; i-- {
		id := s.order[i]
		e := s.m[id]
		if e.visible(ns, now, s.age) && (id == ref || e.Name == ref || strings.HasPrefix(id, ref)) {
			out = append(out, Match{ID: id, Entry: e})
		}
	}
	return out
}

// Answer is the stop answer for a repeat stop of a workload that stopped as e says:
// stopped (the workload is gone, as the caller wants) and saying since when, with the
// time in nexd's extension field, which upstream clients ignore.
func (e Entry) Answer(id string) protocol.StopWorkloadResponse {
	at := e.At.UTC().Format(time.RFC3339)
	msg := "already stopped at " + at
	if e.How != "" && e.How != "stopped" {
		msg = fmt.Sprintf("%s (%s)", msg, e.How)
	}
	return protocol.StopWorkloadResponse{ID: id, Message: msg, Stopped: true, WorkloadType: e.Type, AlreadyStoppedAt: at}
}
