package protocol

import (
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nkeys"
)

// A lame duck drain's outcome as a nexd node tells it (a nexd extension): a client that
// sends HeaderDrainWait on its LAMEDUCK request gets, in the answer's nexd_drain, a
// DrainOutcome "draining" (the node will tell), and once the node's drain ended one more
// LameduckResponse on the same reply subject whose nexd_drain is "drained" or "failed"
// (with the reason). Each is signed with the node's server key over the client's nonce,
// so nobody else on the bus can claim an outcome for the node, and a copy of an earlier
// drain's does not pass for this one. Upstream nodes ignore the header (one answer,
// without nexd_drain); upstream clients never send it.
const (
	DrainDraining = "draining" // the node is in lame duck mode and will tell the outcome
	DrainDrained  = "drained"  // its drain ended without an error: nothing of it runs
	DrainFailed   = "failed"   // its drain ended with an error (Reason), or it stopped before its drain
)

// DrainTellFor bounds how long a node whose drain ended keeps sending its outcome to
// clients that acknowledge it (HeaderDrainAck) and have not yet: the node stops only
// after. A client waits for a told outcome at least this long after the node went
// quiet.
const DrainTellFor = 10 * time.Second

// DrainResend is how often a node sends an unacknowledged outcome again.
const DrainResend = time.Second

// MaxDrainNonce bounds HeaderDrainWait's value.
const MaxDrainNonce = 64

// MaxDrainReason bounds a DrainOutcome's reason (a longer one is cut).
const MaxDrainReason = 2048

// ErrUnsignedDrain marks a drain outcome without a signature.
var ErrUnsignedDrain = errors.New("drain outcome is not signed")

// DrainOutcome is a node's word on its lame duck drain (LameduckResponse.Drain).
type DrainOutcome struct {
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
	// Nonce is the client's HeaderDrainWait value, Sig the node's signature (base64, by
	// its server nkey, the node id) over DrainPayload.
	Nonce string `json:"nonce"`
	Sig   string `json:"sig"`
}

// CheckDrainNonce says whether s may be a HeaderDrainWait value: 1 to 64 letters, digits,
// '-' or '_'.
func CheckDrainNonce(s string) error {
	if s == "" || len(s) > MaxDrainNonce {
		return fmt.Errorf("%s %q: want 1 to %d characters", HeaderDrainWait, s, MaxDrainNonce)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return fmt.Errorf("%s %q: only letters, digits, '-' and '_' are allowed", HeaderDrainWait, s)
		}
	}
	return nil
}

// DrainPayload is what a node signs in a drain outcome: its id, the client's nonce, the
// state and the reason.
func DrainPayload(nodeID string, d DrainOutcome) []byte {
	return []byte("nexd-drain/1\n" + nodeID + "\n" + d.Nonce + "\n" + d.State + "\n" + d.Reason)
}

// VerifyDrain checks that d answers the nonce a client sent node nodeID and was signed
// by that node.
func VerifyDrain(nodeID, nonce string, d DrainOutcome) error {
	if d.Sig == "" {
		return ErrUnsignedDrain
	}
	if d.Nonce != nonce {
		return fmt.Errorf("drain outcome answers nonce %q, not this client's %q: a copy of another drain's", d.Nonce, nonce)
	}
	sig, err := base64.StdEncoding.DecodeString(d.Sig)
	if err != nil {
		return fmt.Errorf("drain outcome signature is not base64: %w", err)
	}
	kp, err := nkeys.FromPublicKey(nodeID)
	if err != nil {
		return fmt.Errorf("node id %q: %w", nodeID, err)
	}
	if err := kp.Verify(DrainPayload(nodeID, d), sig); err != nil {
		return fmt.Errorf("drain outcome signature does not verify with node id %s", nodeID)
	}
	return nil
}
