package protocol

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestEventErrorWire: upstream's WORKLOADSTOPPED carries error.code as a JSON string;
// nexd sends a string and accepts both a string and a number.
func TestEventErrorWire(t *testing.T) {
	out, err := json.Marshal(WorkloadStoppedEvent{ID: "w", Namespace: "ns", WorkloadType: "native",
		Error: &EventError{Code: "3", Message: "exited with code 3"}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), `"error":{"code":"3","message":"exited with code 3"}`) {
		t.Errorf("encoded %s: code must be a JSON string", out)
	}
	tests := []struct {
		name, in, code string
		bad            bool
	}{
		{name: "upstream string", in: `{"code":"3","message":""}`, code: "3"},
		{name: "number", in: `{"code":137,"message":"OOM"}`, code: "137"},
		{name: "negative number", in: `{"code":-1,"message":"x"}`, code: "-1"},
		{name: "missing", in: `{"message":"x"}`, code: ""},
		{name: "null", in: `{"code":null,"message":"x"}`, code: ""},
		{name: "bool", in: `{"code":true,"message":"x"}`, bad: true},
		{name: "object", in: `{"code":{},"message":"x"}`, bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var e EventError
			err := json.Unmarshal([]byte(tt.in), &e)
			if tt.bad {
				if err == nil {
					t.Fatalf("decoded %s as %+v, want an error", tt.in, e)
				}
				return
			}
			if err != nil || e.Code != tt.code {
				t.Fatalf("decode %s = %+v, %v; want code %q", tt.in, e, err, tt.code)
			}
		})
	}
}

// TestAgentStartedEventKeys: upstream decoders require id, name and register_type.
func TestAgentStartedEventKeys(t *testing.T) {
	out, _ := json.Marshal(AgentStartedEvent{ID: "a", Name: "go_exec", RegisterType: "native"})
	var m map[string]any
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"id", "name", "register_type"} {
		if _, ok := m[k]; !ok {
			t.Errorf("AgentStartedEvent %s lacks %q", out, k)
		}
	}
}
