package cli

import (
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestRefsByPrefixAndName: nodes and workloads are found by id, name or unique id
// prefix, and an ambiguous reference lists its candidates.
func TestRefsByPrefixAndName(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	ns1, ns2 := "lab", "prod"
	a := newFakeNode(t, nc, "NAAA1", nil)
	a.workloads = []protocol.WorkloadSummary{
		{ID: "WEB111", Name: "web", Namespace: &ns1, Tags: map[string]string{}},
		{ID: "WEB222", Name: "web", Namespace: &ns2, Tags: map[string]string{}},
		{ID: "DB333", Name: "db", Namespace: &ns1, Tags: map[string]string{}},
	}
	a.stopOK = true
	a.start()
	newFakeNode(t, nc, "NAAB2", nil).start()
	newFakeNode(t, nc, "NZZZ3", nil).start()

	for _, tc := range []struct {
		ref, want string
	}{{"NZ", "NZZZ3"}, {"naab2", "NAAB2"}, {"NAAA1", "NAAA1"}} {
		out, errOut, code := runCLI(t, nil, natsArgs(url, "node", "info", tc.ref)...)
		if code != 0 || !strings.Contains(out, "Information about Node "+tc.want) {
			t.Errorf("node info %s: exit %d, %s%s", tc.ref, code, out, errOut)
		}
	}
	_, errOut, code := runCLI(t, nil, natsArgs(url, "node", "info", "NAA")...)
	if code != 1 || !strings.Contains(errOut, `"NAA" matches 2 nodes`) || !strings.Contains(errOut, "NAAA1 (naaa1)") || !strings.Contains(errOut, "NAAB2 (naab2)") {
		t.Errorf("ambiguous node prefix: exit %d, %q", code, errOut)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "node", "lameduck", "NQ")...)
	if code != 1 || !strings.Contains(errOut, "node NQ not found") {
		t.Errorf("unknown node: exit %d, %q", code, errOut)
	}

	// Workloads: prefix, name, ambiguity across namespaces, and a namespace narrowing it.
	out, errOut, code := runCLI(t, nil, natsArgs(url, "workload", "stop", "DB")...)
	if code != 0 || !strings.Contains(out, "Workload DB333 successfully stopped") {
		t.Errorf("stop by prefix: exit %d, %s%s", code, out, errOut)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "stop", "web")...)
	if code != 1 || !strings.Contains(errOut, `"web" matches 2 workloads`) || !strings.Contains(errOut, "WEB111 (web, namespace lab)") ||
		!strings.Contains(errOut, "WEB222 (web, namespace prod)") {
		t.Errorf("ambiguous name: exit %d, %q", code, errOut)
	}
	out, errOut, code = runCLI(t, nil, natsArgs(url, "--namespace", "prod", "workload", "stop", "web")...)
	if code != 0 || !strings.Contains(out, "Workload WEB222 successfully stopped") {
		t.Errorf("name in a namespace: exit %d, %s%s", code, out, errOut)
	}
	a.mu.Lock()
	stops := strings.Join(a.stops, " ")
	a.mu.Unlock()
	if !strings.Contains(stops, ".lab.control.UNDEPLOY.DB333") || !strings.Contains(stops, ".prod.control.UNDEPLOY.WEB222") {
		t.Errorf("undeploys went to %s", stops)
	}

	// Completion offers ids (with names) and names, live. Within its own 1.5 s
	// (completionTimeout): natsArgs' 1 s gather stall left half a second for the
	// connection and the first answers, which -race at load 7 overran (no candidates).
	complete := func(args ...string) []string {
		return append([]string{"-s", url, "--gather-stall", "200ms", "__complete"}, args...)
	}
	out, _, code = runCLI(t, nil, complete("node", "info", "NA")...)
	if code != 0 || !strings.Contains(out, "NAAA1\tnaaa1") || !strings.Contains(out, "NAAB2\tnaab2") || strings.Contains(out, "NZZZ3") {
		t.Errorf("node completion: %q", out)
	}
	out, _, _ = runCLI(t, nil, complete("workload", "logs", "")...)
	for _, w := range []string{"WEB111\tweb", "DB333\tdb", "web\tWEB111"} {
		if !strings.Contains(out, w) {
			t.Errorf("workload completion lacks %q: %q", w, out)
		}
	}
}

func TestMatchRef(t *testing.T) {
	cands := []candidate{{ID: "NABC", Name: "alpha"}, {ID: "NABD", Name: "NABC"}, {ID: "NXYZ", Name: "beta"}}
	for _, tc := range []struct {
		ref  string
		want []string
	}{
		{"NABC", []string{"NABC"}}, // an exact id beats a name that equals it
		{"beta", []string{"NXYZ"}},
		{"NX", []string{"NXYZ"}},
		{"NAB", []string{"NABC", "NABD"}},
		{"Q", nil},
	} {
		m, err := matchRef("node", tc.ref, cands)
		var got []string
		for _, c := range m {
			got = append(got, c.ID)
		}
		if err != nil || strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("matchRef(%q) = %v %v, want %v", tc.ref, got, err, tc.want)
		}
	}
}

// TestStopIDTheListMissed: from system, a whole workload id that no list answer named
// (a node's answer that came late under load, or its nexlet's) is still sent its stop,
// and the node holding it answers; before, nexctl said "not found" without asking
// (e2e TestSlowStopTruthfulAnswer at load 20: a second stop of a stopping workload). An
// id no node holds, and a name no list names, are still reported not found.
func TestStopIDTheListMissed(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	a := newFakeNode(t, nc, "NAAA1", nil) // lists nothing: its list answer missed the workload
	a.stopOK = true
	a.start()
	const id = "aDqYSZ2aIvLTDISr3fAsgI"
	out, errOut, code := runCLI(t, nil, natsArgs(url, "workload", "stop", id)...)
	if code != 0 || !strings.Contains(out, "Workload "+id+" successfully stopped") {
		t.Errorf("stop of an id the list missed: exit %d, %q %q", code, out, errOut)
	}
	a.mu.Lock()
	stops := strings.Join(a.stops, " ")
	a.mu.Unlock()
	if !strings.Contains(stops, ".system.control.UNDEPLOY."+id) {
		t.Errorf("undeploys went to %q", stops)
	}

	s2 := testnats.Start(t, testnats.Options{NoJetStream: true})
	url = s2.ClientURL()
	b := newFakeNode(t, testnats.Connect(t, s2), "NBBB2", nil) // holds nothing, says so
	b.start()
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "stop", "aDqYSZ2aIvLTDISr3fAsXX")...)
	if code != 1 || !strings.Contains(errOut, "not found in namespace system") {
		t.Errorf("stop of an id no node holds: exit %d, %q", code, errOut)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "stop", "noname")...)
	if code != 1 || !strings.Contains(errOut, "workload noname not found in namespace system") {
		t.Errorf("stop of an unknown name: exit %d, %q", code, errOut)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if strings.Contains(strings.Join(b.stops, " "), "noname") {
		t.Errorf("a name no list named was sent a stop: %v", b.stops)
	}
}
