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

// maxSeenPerKey bounds the signatures remembered within the window for one signing
// key: a nexlet signs a few messages an hour (its registration, its renewals and
// their switch reports). Beyond it that key's signed messages are refused until its
// older ones leave the window; other keys' are not. Before, one bound held for every
// key together, and a rogue nexlet that signed that many messages of its own had every
// other nexlet's registration over NATS and renewal of its own user refused for as
// long as it kept the table full (TestAttackRogueNexletFillsSeenSignatures).
const maxSeenPerKey = 1_000

// maxSeenSignatures bounds the signatures remembered for all keys together, for
// memory only: the keys are those the node expects (its supervised nexlets' starts'
// and remote_nexlets), so reaching it takes a hundred keys each at its own bound
// within one window.
const maxSeenSignatures = 100 * maxSeenPerKey

// seenSignatures remembers the signatures of the signed registrations and renewals
// the node accepted, until their time leaves protocol.RegistrationWindow: an admin or
// an open bus's client that captured one and publishes it again gets it refused (a
// replayed registration would otherwise mint a fresh nexlet user for the inbox it
// names, revoke the nexlet's current users as superseded and reconcile its workloads
// against an old list; a replayed renewal would revoke the nexlet's newer user). A
// copy replayed after the window is refused for its time. What is remembered is lost
// with the process: a restarted nexd takes a message signed before its start only
// within the window, and only once. Signatures are kept by the key that made them, so
// that one key's messages count against its own bound alone.
type seenSignatures struct {
	mu    sync.Mutex
	keys  map[string]*keySignatures // signing key -> its signatures in the window
	total int
}

// keySignatures are one key's remembered signatures.
type keySignatures struct {
	seen map[string]time.Time // signature -> when it leaves the window
	next time.Time            // the earliest of those times: nothing to forget before it
}

// forget drops the signatures that left the window by now, and says how many went.
func (k *keySignatures) forget(now time.Time) int {
	if !now.After(k.next) {
		return 0
	}
	gone := 0
	k.next = time.Time{}
	for sig, until := range k.seen {
		switch {
		case now.After(until):
			delete(k.seen, sig)
			gone++
		case k.next.IsZero() || until.Before(k.next):
			k.next = until
		}
	}
	return gone
}

// accept records sig, made by key and signed at at, as used, or says why it may not
// be used (now is the node's clock).
func (s *seenSignatures) accept(key, sig string, at, now time.Time) error {
	if d := now.Sub(at); d > protocol.RegistrationWindow || d < -protocol.RegistrationWindow {
		return fmt.Errorf("signed at %s, %s away from the node's clock (%s), more than %s: a replayed copy, or the nexlet's clock is off",
			at.UTC().Format(time.RFC3339Nano), d.Round(time.Millisecond).Abs(), now.UTC().Format(time.RFC3339), protocol.RegistrationWindow)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys == nil {
		s.keys = map[string]*keySignatures{}
	}
	k := s.keys[key]
	if k == nil {
		// A new key (a nexlet's new start): the keys whose signatures all left the
		// window go, so keys of starts long gone are not kept.
		for kk, ks := range s.keys {
			if s.total -= ks.forget(now); len(ks.seen) == 0 {
				delete(s.keys, kk)
			}
		}
		k = &keySignatures{seen: map[string]time.Time{}}
		s.keys[key] = k
	}
	if _, ok := k.seen[sig]; ok {
		return fmt.Errorf("replayed: this signed message (signed at %s) was taken before; each is taken once", at.UTC().Format(time.RFC3339Nano))
	}
	if len(k.seen) >= maxSeenPerKey {
		s.total -= k.forget(now)
		if len(k.seen) >= maxSeenPerKey {
			return fmt.Errorf("refused: %d messages signed by key %s taken within %s, the most one key may; try again later", len(k.seen), key, protocol.RegistrationWindow)
		}
	}
	if s.total >= maxSeenSignatures {
		for kk, ks := range s.keys {
			s.total -= ks.forget(now)
			if len(ks.seen) == 0 && ks != k {
				delete(s.keys, kk)
			}
		}
		if s.total >= maxSeenSignatures {
			return fmt.Errorf("refused: %d signed messages taken within %s; try again later", s.total, protocol.RegistrationWindow)
		}
	}
	until := at.Add(protocol.RegistrationWindow)
	k.seen[sig] = until
	if k.next.IsZero() || until.Before(k.next) {
		k.next = until
	}
	s.total++
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
	if err := n.signed.accept(pub, b64, time.Unix(0, ns), time.Now()); err != nil {
		return fmt.Errorf("registration %w", err)
	}
	return nil
}
