package node

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// TestSeenSignaturesBounded: at maxSeenPerKey within the window a key's new signature
// is refused, saying so, while another key's is taken; once the remembered ones leave
// the window, it is taken. All keys together are bounded by maxSeenSignatures.
func TestSeenSignaturesBounded(t *testing.T) {
	var s seenSignatures
	now := time.Now()
	for i := range maxSeenPerKey {
		if err := s.accept("rogue", strconv.Itoa(i), now, now); err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
	}
	err := s.accept("rogue", "one more", now, now)
	if err == nil || !strings.Contains(err.Error(), "refused: ") || !strings.Contains(err.Error(), "key rogue") || !strings.Contains(err.Error(), "try again later") {
		t.Fatalf("beyond the key's bound: %v, want refused naming the key, try again later", err)
	}
	if err := s.accept("honest", "its own", now, now); err != nil {
		t.Fatalf("another key's signature while the rogue's is at its bound: %v", err)
	}
	if err := s.accept("honest", "its own", now, now); err == nil || !strings.Contains(err.Error(), "replayed") {
		t.Fatalf("the other key's signature again: %v, want replayed", err)
	}
	later := now.Add(protocol.RegistrationWindow + time.Second)
	if err := s.accept("rogue", "one more", later, later); err != nil {
		t.Fatalf("once the others left the window: %v", err)
	}
	if len(s.keys["rogue"].seen) != 1 || s.total != 2 {
		t.Fatalf("%d of the key's signatures remembered, %d in all; want the new one alone, and the other key's", len(s.keys["rogue"].seen), s.total)
	}
	if err := s.accept("new", "first", later, later); err != nil {
		t.Fatal(err)
	}
	if _, kept := s.keys["honest"]; kept || s.total != 2 {
		t.Fatalf("a key whose signatures all left the window is kept (%v), %d in all; want it gone at a new key, 2 in all", kept, s.total)
	}

	// All keys together.
	var all seenSignatures
	for k := range maxSeenSignatures / maxSeenPerKey {
		for i := range maxSeenPerKey {
			if err := all.accept(strconv.Itoa(k), strconv.Itoa(i), now, now); err != nil {
				t.Fatalf("key %d, signature %d: %v", k, i, err)
			}
		}
	}
	if err := all.accept("one more key", "first", now, now); err == nil || !strings.Contains(err.Error(), "try again later") {
		t.Fatalf("beyond the bound of all keys: %v, want refused", err)
	}
	if err := all.accept("one more key", "first", later, later); err != nil {
		t.Fatalf("once the others left the window: %v", err)
	}
	if all.total != 1 {
		t.Fatalf("%d signatures remembered, want the new one alone", all.total)
	}
}
