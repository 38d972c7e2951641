package cli

import (
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestEventsNoneArrivedSaysWhy: with no event in the wait, the warning says how a node
// is made to publish them (the README's first node has events off, and `nexctl events`
// there only said that none arrived).
func TestEventsNoneArrivedSaysWhy(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	_, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "events", "--wait", "100ms")...)
	if code != 0 || !strings.Contains(errOut, "no events arrived within 100ms") || !strings.Contains(errOut, `events = "nats"`) {
		t.Fatalf("events with none: exit %d, stderr %q", code, errOut)
	}
}

func TestEventsSubjectAndDescription(t *testing.T) {
	for _, tc := range []struct{ node, ns, typ, want string }{
		{"", "system", "", "$NEX.FEED.*.events.*"},
		{"", "lab", "", "$NEX.FEED.lab.events.*"},
		{"NABC", "lab", protocol.EventNodeStopped, "$NEX.FEED.NABC.events.NODESTOPPED"},
	} {
		if got := eventsSubject(tc.node, tc.ns, tc.typ); got != tc.want {
			t.Errorf("eventsSubject(%q, %q, %q) = %q, want %q", tc.node, tc.ns, tc.typ, got, tc.want)
		}
	}
	for typ, want := range map[string][2]string{
		protocol.EventWorkloadStopped:    {`{"id":"W1","namespace":"lab","workload_type":"native","error":{"code":"137","message":"killed by the OOM killer (memory limit reached)"}}`, "workload W1 stopped (native, namespace lab): exit code 137: killed by the OOM killer"},
		protocol.EventWorkloadStarted:    {`{"id":"W1","namespace":"lab","workload_type":"native"}`, "workload W1 started (native, namespace lab)"},
		protocol.EventAgentHealthChanged: {`{"id":"A1","name":"go_exec","from":"healthy","to":"degraded"}`, "nexlet go_exec health healthy -> degraded"},
		protocol.EventNodeLameduckSet:    {`{"id":"N1","time":"2026-12-01T12:00:00Z"}`, "node N1 in lame duck mode; workloads stop at 2026-12-01T12:00:00Z"},
	} {
		if got := describeEvent(typ, []byte(want[0])); !strings.HasPrefix(got, want[1]) {
			t.Errorf("%s: %q, want %q", typ, got, want[1])
		}
	}
}
