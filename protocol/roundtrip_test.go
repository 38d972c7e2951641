package protocol

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// fixtures maps each testdata file to a fresh value of its type.
func fixtures() map[string]func() any {
	return map[string]func() any{
		"NodePingRequest":             func() any { return &NodePingRequest{} },
		"NodePingResponse":            func() any { return &NodePingResponse{} },
		"NodeInfoResponse":            func() any { return &NodeInfoResponse{} },
		"LameduckRequest":             func() any { return &LameduckRequest{} },
		"LameduckResponse":            func() any { return &LameduckResponse{} },
		"AuctionRequest":              func() any { return &AuctionRequest{} },
		"AuctionResponse":             func() any { return &AuctionResponse{} },
		"StartWorkloadRequest":        func() any { return &StartWorkloadRequest{} },
		"StartWorkloadResponse":       func() any { return &StartWorkloadResponse{} },
		"AgentStartWorkloadRequest":   func() any { return &AgentStartWorkloadRequest{} },
		"StopWorkloadRequest":         func() any { return &StopWorkloadRequest{} },
		"StopWorkloadResponse":        func() any { return &StopWorkloadResponse{} },
		"CloneWorkloadRequest":        func() any { return &CloneWorkloadRequest{} },
		"AgentListWorkloadsRequest":   func() any { return &AgentListWorkloadsRequest{} },
		"WorkloadSummary":             func() any { return &WorkloadSummary{} },
		"RegisterAgentRequest":        func() any { return &RegisterAgentRequest{} },
		"RegisterAgentResponse":       func() any { return &RegisterAgentResponse{} },
		"RegisterRemoteAgentResponse": func() any { return &RegisterRemoteAgentResponse{} },
		"AgentHeartbeat":              func() any { return &AgentHeartbeat{} },
		"NatsConnectionData":          func() any { return &NatsConnectionData{} },
	}
}

// TestFixturesRoundTrip decodes every fixture, encodes it again and checks that the
// JSON is the same document: every field name and required key survives.
func TestFixturesRoundTrip(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.json")
	if len(files) != len(fixtures()) {
		t.Fatalf("%d fixtures on disk, %d types listed", len(files), len(fixtures()))
	}
	for name, mk := range fixtures() {
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("testdata", name+".json"))
			if err != nil {
				t.Fatal(err)
			}
			v := mk()
			if err := Decode(raw, v); err != nil {
				t.Fatalf("decode: %v", err)
			}
			out, err := json.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			var a, b any
			json.Unmarshal(raw, &a)
			json.Unmarshal(out, &b)
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("round trip changed the message:\n in: %s\nout: %s", raw, out)
			}
		})
	}
}

// TestRequiredKeysEncoded checks that zero values still carry every required key, since
// upstream's decoders reject a message without one.
func TestRequiredKeysEncoded(t *testing.T) {
	for name, mk := range fixtures() {
		v := mk()
		out, _ := json.Marshal(v)
		var obj map[string]json.RawMessage
		json.Unmarshal(out, &obj)
		for _, k := range requiredKeys(v) {
			if _, ok := obj[k]; !ok {
				t.Errorf("%s: zero value drops required key %q: %s", name, k, out)
			}
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		in   string
		v    any
		want string
	}{
		{`{}`, &NodePingRequest{}, `invalid NodePingRequest: field "filter": required field is missing`},
		{`{"filter":null}`, &NodePingRequest{}, ""},
		{`{"agent_type":"native","auction_id":"x"}`, &AuctionRequest{}, `field "tags": required field is missing`},
		{`{"agent_type":5,"auction_id":"x","tags":{}}`, &AuctionRequest{}, `field "agent_type": expected string, got JSON number`},
		{`{"delay":"2m"`, &LameduckRequest{}, `malformed JSON`},
		{``, &StopWorkloadRequest{}, `empty message`},
		{`null`, &StopWorkloadRequest{}, `expected a JSON object`},
		{`[]`, &StopWorkloadRequest{}, `cannot unmarshal array`},
		{`{"description":"","name":"a","namespace":"n","run_request":"{}","tags":{},"workload_lifecycle":"forever","workload_type":"native"}`,
			&StartWorkloadRequest{}, `field "workload_lifecycle": "forever" is not one of service, job, function`},
	}
	for _, tc := range tests {
		err := Decode([]byte(tc.in), tc.v)
		if tc.want == "" {
			if err != nil {
				t.Errorf("Decode(%s) = %v, want nil", tc.in, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%s) = %v, want %q", tc.in, err, tc.want)
		}
		var de *DecodeError
		if err != nil && !errors.As(err, &de) {
			t.Errorf("Decode(%s) error is %T, want *DecodeError", tc.in, err)
		}
	}
}

func TestLameduckDelay(t *testing.T) {
	for in, ok := range map[string]bool{"2m0s": true, "0s": true, "-1s": false, "soon": false} {
		_, err := LameduckRequest{Delay: in}.ParseDelay()
		if (err == nil) != ok {
			t.Errorf("ParseDelay(%q) err = %v", in, err)
		}
	}
}

func TestSubjects(t *testing.T) {
	tests := map[string]string{
		PingSubject():                        "$NEX.SVC.system.control.PING",
		PingNodeSubject("N1"):                "$NEX.SVC.system.control.PING.N1",
		PTagsSubject():                       "$NEX.SVC.system.control.PTAGS",
		InfoSubject("N1"):                    "$NEX.SVC.system.control.INFO.N1",
		LameduckSubject("N1"):                "$NEX.SVC.system.control.LAMEDUCK.N1",
		AgentIDSubject("N1"):                 "$NEX.SVC.system.control.AGENTID.N1",
		NodeHeartbeatSubject("N1"):           "$NEX.SVC.system.control.HEARTBEAT.N1",
		AuctionSubject("ns"):                 "$NEX.SVC.ns.control.AUCTION",
		DeploySubject("ns", "b"):             "$NEX.SVC.ns.control.ADEPLOY.b",
		UndeploySubject("ns", "w"):           "$NEX.SVC.ns.control.UNDEPLOY.w",
		CloneSubject("ns", "w"):              "$NEX.SVC.ns.control.CLONE.w",
		WPingSubject("ns"):                   "$NEX.SVC.ns.control.WPING",
		RegisterSubject("N1", "a"):           "$NEX.SVC.N1.agent.REGISTER.a",
		RemoteRegisterSubject("nexus"):       "$NEX.SVC.nexus.agent.RREGISTER",
		AgentHeartbeatSubject("N1", "a"):     "$NEX.SVC.N1.agent.HEARTBEAT.a",
		StartWorkloadSubject("N1", "a", "w"): "$NEX.SVC.N1.agent.a.STARTWORKLOAD.w",
		StopWorkloadSubject("N1", "w"):       "$NEX.SVC.N1.agent.STOPWORKLOAD.w",
		GetWorkloadSubject("N1", "w"):        "$NEX.SVC.N1.agent.GETWORKLOAD.w",
		QueryWorkloadsSubject("N1"):          "$NEX.SVC.N1.agent.QUERYWORKLOADS",
		PingAgentSubject("N1", "a"):          "$NEX.SVC.N1.agent.a.PING",
		PingAllAgentsSubject("N1"):           "$NEX.SVC.N1.agent.PING",
		SetLameduckAgentsSubject("N1"):       "$NEX.SVC.N1.agent.SETLAMEDUCK",
		PingWorkloadSubject("nexus", "w"):    "$NEX.SVC.nexus.agent.PINGWORKLOAD.w",
		LogSubject("ns", "w", "stdout"):      "$NEX.FEED.ns.logs.w.stdout",
		MetricsSubject("ns", "w"):            "$NEX.FEED.ns.metrics.w",
		EventSubject("N1", EventNodeStarted): "$NEX.FEED.N1.events.NODESTARTED",
		NodeLogSubject("N1", "stderr"):       "$NEX.FEED.system.logs.N1.stderr",
		AgentEventsSubject("a"):              "$NEX.FEED.a.events",
	}
	for got, want := range tests {
		if got != want {
			t.Errorf("subject %q, want %q", got, want)
		}
	}
	if NamespaceOf("$NEX.SVC.ns1.control.AUCTION") != "ns1" || LastToken("a.b.c") != "c" || Token("a.b", 5) != "" {
		t.Error("token helpers")
	}
}

// FuzzDecode feeds arbitrary bytes to every message decoder: no panic, every error a
// DecodeError that names the message type ("invalid <Type>"), and a message decoded is
// encoded back to one that decodes.
func FuzzDecode(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.json")
	for _, p := range files {
		b, _ := os.ReadFile(p)
		f.Add(b)
	}
	f.Add([]byte(`{"filter":{"a":1}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		for name, mk := range fixtures() {
			v := mk()
			err := Decode(data, v)
			if err != nil {
				var de *DecodeError
				if !errors.As(err, &de) || !strings.HasPrefix(err.Error(), "invalid ") || de.Type == "" {
					t.Fatalf("%s: error %q is not a DecodeError naming the message", name, err)
				}
				continue
			}
			b, err := json.Marshal(v)
			if err != nil {
				t.Fatalf("%s decoded from %q does not encode: %v", name, data, err)
			}
			if err := Decode(b, mk()); err != nil {
				t.Fatalf("%s decoded from %q, encoded as %s, does not decode: %v", name, data, b, err)
			}
		}
	})
}
