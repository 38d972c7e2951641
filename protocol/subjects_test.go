package protocol

import (
	"regexp"
	"testing"
)

// TestIsToken checks the loop against the rule it replaced, ^[A-Za-z0-9_-]+$.
func TestIsToken(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	for _, s := range []string{"", "a", "default", "Ns_1-2", "a.b", "a b", "a/b", "*", ">", "ü", "a\n", "-", "_", "0"} {
		if got, want := IsToken(s), re.MatchString(s); got != want {
			t.Errorf("IsToken(%q) = %v, want %v", s, got, want)
		}
	}
}

// TestReservedAgentIDsCoverAgentSubjects: every word the node's own agent-plane
// subjects put where a nexlet's id goes (AgentPrefix(node).<word>…) is refused as an
// agent id, so no nexlet's subjects are the node's endpoints or fan-outs; a nexlet's
// own subjects start with its id.
func TestReservedAgentIDsCoverAgentSubjects(t *testing.T) {
	const node, agent, wid = "N", "A", "W"
	for _, s := range []string{
		RegisterSubject(node, agent), RemoteRegisterSubject(node), AgentHeartbeatSubject(node, agent),
		StartWorkloadSubject(node, agent, wid), StopWorkloadSubject(node, wid), GetWorkloadSubject(node, wid),
		QueryWorkloadsSubject(node), QueryWorkloadsAgentSubject(node, agent), StopWorkloadAgentSubject(node, agent, wid),
		GetWorkloadAgentSubject(node, agent, wid), PingAgentSubject(node, agent), PingAllAgentsSubject(node),
		SetLameduckAgentsSubject(node), PingWorkloadSubject(node, wid), FeedRelaySubject(node, agent, "$NEX.FEED.ns.logs.W.stdout"),
		RenewCredsSubject(node, agent, wid), WorkloadEndedSubject(node, agent, wid), RenewAgentCredsSubject(node, agent),
	} {
		word := Token(s, 4)
		if word != agent && !ReservedAgentID(word) {
			t.Errorf("subject %s: %q may be a nexlet's agent id", s, word)
		}
	}
	for _, ok := range []string{"feed", "remote-a", "nexd-1", "PINGS"} {
		if ReservedAgentID(ok) {
			t.Errorf("agent id %q refused", ok)
		}
	}
}
