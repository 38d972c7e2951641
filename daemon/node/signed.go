package node

import (
	"encoding/base64"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

// maxSeenSignatures bounds the signatures remembered within the window. Only a holder
// of a key the node expects can add one (the signature verified first), and a nexlet
// signs a few messages an hour; beyond the bound signed messages are refused until
// older ones leave the window.
const maxSeenSignatures = 10_000

// seenSignatures remembers the signatures of the signed registrations and renewals
// the node accepted, until their time leaves protocol.RegistrationWindow: an admin or
// an open bus's client that captured one and publishes it again gets it refused (a
// replayed registration would otherwise mint a fresh nexlet user for the inbox it
// names, revoke the nexlet's current users as superseded and reconcile its workloads
// against an old list; a replayed renewal would revoke the nexlet's newer user). A
// copy replayed after the window is refused for its time. What is remembered is lost
// with the process: a restarted nexd takes a message signed before its start only
// within the window, and only once.
type seenSignatures struct {
	mu   sync.Mutex
	seen map[string]time.Time // signature -> when it leaves the window
}

// accept records sig, signed at at, as used, or says why it may not be used (now is
// the node's clock).
func (s *seenSignatures) accept(sig string, at, now time.Time) error {
	if d := now.Sub(at); d > protocol.RegistrationWindow || d < -protocol.RegistrationWindow {
		return fmt.Errorf("signed at %s, %s away from the node's clock (%s), more than %s: a replayed copy, or the nexlet's clock is off",
			at.UTC().Format(time.RFC3339Nano), d.Round(time.Millisecond).Abs(), now.UTC().Format(time.RFC3339), protocol.RegistrationWindow)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seen == nil {
		s.seen = map[string]time.Time{}
	}
	if _, ok := s.seen[sig]; ok {
		return fmt.Errorf("replayed: this signed message (signed at %s) was taken before; each is taken once", at.UTC().Format(time.RFC3339Nano))
	}
	if len(s.seen) >= maxSeenSignatures {
		for k, until := range s.seen {
			if now.After(until) {
				delete(s.seen, k)
			}
		}
		if len(s.seen) >= maxSeenSignatures {
			return fmt.Errorf("refused: %d signed messages taken within %s; try again later", len(s.seen), protocol.RegistrationWindow)
		}
	}
	s.seen[sig] = at.Add(protocol.RegistrationWindow)
	return nil
}

// verifyRegistration checks the signature by pub over a registration (or a nexlet's
// renewal of its own user, signed the same way), its time, and that it was not taken
// before (not the last two for one on a local channel, which never crossed the bus).
func (n *Node) verifyRegistration(r micro.Request, pub string) error {
	if got := r.Headers().Get(protocol.HeaderRegistrationKey); got != "" && got != pub {
		return fmt.Errorf("registration signed by %s, not by the expected key %s", got, pub)
	}
	b64 := r.Headers().Get(protocol.HeaderRegistrationSig)
	if b64 == "" {
		return fmt.Errorf("registration is not signed (no %s header)", protocol.HeaderRegistrationSig)
	}
	sig, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return fmt.Errorf("registration signature: not base64: %w", err)
	}
	atText := r.Headers().Get(protocol.HeaderRegistrationTime)
	if atText == "" {
		return fmt.Errorf("registration has no %s header: the nexlet signs without a time (an SDK older than the node's); rebuild it", protocol.HeaderRegistrationTime)
	}
	ns, err := strconv.ParseInt(atText, 10, 64)
	if err != nil {
		return fmt.Errorf("registration time %q in %s: want Unix nanoseconds", atText, protocol.HeaderRegistrationTime)
	}
	kp, err := nkeys.FromPublicKey(pub)
	if err != nil {
		return fmt.Errorf("registration key %q: %w", pub, err)
	}
	if err := kp.Verify(protocol.RegistrationPayload(r.Subject(), atText, r.Data()), sig); err != nil {
		return fmt.Errorf("registration signature does not verify with key %s", pub)
	}
	if _, local := r.(*localRequest); local {
		// Never on the bus, so never captured; and a patient nexlet's waits on its
		// channel until the node serves, which may be longer than the window.
		return nil
	}
	if err := n.signed.accept(b64, time.Unix(0, ns), time.Now()); err != nil {
		return fmt.Errorf("registration %w", err)
	}
	return nil
}
