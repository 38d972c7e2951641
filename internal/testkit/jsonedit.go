package testkit

import (
	"encoding/json"
	"testing"
)

// EditJSON is the JSON object doc with field set to raw (a JSON value as written), or
// removed when raw is "": a record as a hand edit leaves it.
func EditJSON(t testing.TB, doc []byte, field, raw string) []byte {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(doc, &m); err != nil {
		t.Fatalf("testkit: edit %s of %q: %v", field, doc, err)
	}
	if raw == "" {
		delete(m, field)
	} else {
		m[field] = json.RawMessage(raw)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatalf("testkit: edit %s to %s: %v", field, raw, err)
	}
	return b
}
