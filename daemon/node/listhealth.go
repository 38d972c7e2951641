package node

import (
	"math/bits"
	"strings"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// The node hears an upstream-SDK nexlet's workload ends only from whole list rounds
// (listends.go). A rogue nexlet on the shared subjects can keep every round from being
// whole, and a nexlet busy for long does too: then no end is heard, and an ended job
// runs again at its nexlet's next registration. The node says so: a warning once a
// nexlet's rounds were not whole listStallRounds times in a row (one is ordinary: a
// nexlet busy replaying), again each listStallWarnEvery while it lasts, an info line
// when a round is whole again; a mark on the nexlet (AgentInfo.EndsUnheard, INFO's
// nexd_ends_unheard) and counters by the check that failed (ListChecksFailed).

// listCheck is a check a list round failed, as a bit set.
type listCheck uint8

const (
	checkAnswersMissing listCheck = 1 << iota // fewer answers than nexlets asked on the shared subject
	checkAnswersExtra                         // more answers than nexlets asked: some nexlet answered in another's name
	checkAnswerFailed                         // an answer was an error, or no list
	checkListedTwice                          // a workload listed twice
	checkNoPing                               // the nexlet did not answer its own ping
	checkCount                                // its own count differs from its workloads listed
	checkAskFailed                            // the round could not be asked (NATS)
	listChecks          = 7
)

// listCheckName is the label of the check bit i (1<<i).
func listCheckName(i int) string {
	switch listCheck(1) << i {
	case checkAnswersMissing:
		return "answers_missing"
	case checkAnswersExtra:
		return "answers_extra"
	case checkAnswerFailed:
		return "answer_failed"
	case checkListedTwice:
		return "listed_twice"
	case checkNoPing:
		return "no_ping_answer"
	case checkCount:
		return "count_mismatch"
	case checkAskFailed:
		return "ask_failed"
	}
	return "unknown"
}

func (c listCheck) String() string {
	var names []string
	for c != 0 {
		i := bits.TrailingZeros8(uint8(c))
		names = append(names, listCheckName(i))
		c &^= 1 << i
	}
	return strings.Join(names, ",")
}

const (
	// listStallRounds rounds in a row not whole make a nexlet's ends unheard (reported).
	listStallRounds = 3
	// listStallWarnEvery is how often the warning repeats while it lasts.
	listStallWarnEvery = time.Minute
)

// listStall is how a watched nexlet's list rounds went since its last whole one.
type listStall struct {
	since  time.Time // the first round not whole; zero while they are whole
	rounds int       // rounds not whole in a row
	failed listCheck // the checks the last one failed
	detail string    // what the last one heard
	warned time.Time // the last warning; zero: not reported
}

// endsUnheardLocked is r's mark, or nil when its ends are heard (or not yet reported).
func (r *registration) endsUnheardLocked() *protocol.EndsUnheard {
	s := r.stall
	if s.warned.IsZero() {
		return nil
	}
	return &protocol.EndsUnheard{Since: s.since.UTC(), Rounds: s.rounds, Checks: s.failed.String()}
}

// countChecks counts a failed round's checks (ListChecksFailed).
func (n *Node) countChecks(c listCheck) {
	for i := range listChecks {
		if c&(1<<i) != 0 {
			n.listFails[i].Add(1)
		}
	}
}

// ListChecksFailed returns how many times each check of the list rounds for ended
// workloads failed since the node was built, for every check (0 included): a round
// counts once for the shared subject's checks, once per nexlet for its own.
func (n *Node) ListChecksFailed() map[string]uint64 {
	out := make(map[string]uint64, listChecks)
	for i := range listChecks {
		out[listCheckName(i)] = n.listFails[i].Load()
	}
	return out
}

// roundNotWholeLocked records that a round heard nothing of r's ends.
func (n *Node) roundNotWholeLocked(r *registration, failed listCheck, detail string, now time.Time) {
	s := &r.stall
	if s.since.IsZero() {
		s.since = now
	}
	s.rounds++
	s.failed, s.detail = failed, detail
	if s.rounds < listStallRounds || (!s.warned.IsZero() && now.Sub(s.warned) < listStallWarnEvery) {
		return
	}
	s.warned = now
	n.log.Warn("nexlet's workload ends are not heard: its list rounds are not whole (a nexlet answering in another's name, or one that does not answer); its jobs that end meanwhile run again at its next registration",
		"agent_id", r.id, "name", r.req.Name, "type", r.req.RegisterType, "since", s.since.UTC().Format(time.RFC3339),
		"for", now.Sub(s.since).Round(time.Second).String(), "rounds", s.rounds, "failed", s.failed.String(), "heard", detail)
}

// roundWholeLocked records a whole round for r (or that none is held for it: held
// false, it holds no workloads).
func (n *Node) roundWholeLocked(r *registration, now time.Time, held bool) {
	s := r.stall
	r.stall = listStall{}
	if s.warned.IsZero() {
		return
	}
	msg := "nexlet's list rounds are whole again; its workload ends are heard"
	if !held {
		msg = "nexlet holds no workloads in node state any more; no ends of it to hear"
	}
	n.log.Info(msg, "agent_id", r.id, "name", r.req.Name, "type", r.req.RegisterType,
		"for", now.Sub(s.since).Round(time.Second).String(), "rounds", s.rounds)
}
