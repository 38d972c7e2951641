package node

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// TestSeenSignaturesBounded: at maxSeenSignatures within the window a new signature is
// refused, saying so; once the remembered ones leave the window, it is taken.
func TestSeenSignaturesBounded(t *testing.T) {
	var s seenSignatures
	now := time.Now()
	for i := range maxSeenSignatures {
		if err := s.accept(strconv.Itoa(i), now, now); err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
	}
	err := s.accept("one more", now, now)
	if err == nil || !strings.Contains(err.Error(), "refused: ") || !strings.Contains(err.Error(), "try again later") {
		t.Fatalf("beyond the bound: %v, want refused, try again later", err)
	}
	later := now.Add(protocol.RegistrationWindow + time.Second)
	if err := s.accept("one more", later, later); err != nil {
		t.Fatalf("once the others left the window: %v", err)
	}
	if len(s.seen) != 1 {
		t.Fatalf("%d signatures remembered, want the new one alone", len(s.seen))
	}
}
