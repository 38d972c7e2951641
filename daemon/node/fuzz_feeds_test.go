package node

import (
	"encoding/json"
	"strings"
	"testing"
)

// FuzzEventWorkloadID: whatever a nexlet puts in an event's body, the workload it is
// taken to be about (the one the node checks is the nexlet's own) is the one every
// reader of the feed sees: the body is one JSON object, with the key "id" exactly so
// spelled and no other key that case-folds to it, holding that id, for a reader that
// matches keys exactly (a map) and for one that folds case (Go's struct decoding).
func FuzzEventWorkloadID(f *testing.F) {
	for _, s := range []string{
		`{"id":"W1","namespace":"tenant","type":"started"}`,
		`{"id":"W1","ID":"W2"}`,
		`{"Id":"W1"}`,
		`{"id":"W1","id":"W2"}`,
		`{"id":"W1"}{"id":"W2"}`,
		`{"id":"W1"} `,
		`{"id":1}`,
		`{"x":{"id":"W2"},"id":"W1"}`,
		`{"i\u0064":"W1"}`,
		`[{"id":"W1"}]`,
		"{\"id\":\"W1\",\"\u0131d\":\"W2\"}",
		"{\"id\":\"W1\",\"\u0130D\":\"W2\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		id := eventWorkloadID(data)
		if id == "" {
			return
		}
		if !json.Valid(data) {
			t.Fatalf("%q: taken as about %q but is not one JSON value", data, id)
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatalf("%q: taken as about %q but is not an object: %v", data, id, err)
		}
		var exact string
		if err := json.Unmarshal(m["id"], &exact); err != nil || exact != id {
			t.Fatalf("%q: taken as about %q, an exact reader sees %q (%v)", data, id, exact, err)
		}
		for k := range m {
			if k != "id" && strings.EqualFold(k, "id") {
				t.Fatalf("%q: taken as about %q beside a key %q", data, id, k)
			}
		}
		var folded struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(data, &folded); err != nil || folded.ID != id {
			t.Fatalf("%q: taken as about %q, a case-folding reader sees %q (%v)", data, id, folded.ID, err)
		}
	})
}
