package protocol

import (
	"encoding/base64"
	"errors"
	"fmt"

	"github.com/nats-io/nkeys"
)

// ErrUnsignedBid marks a bid without a signature (an upstream node, or anyone posing as
// a node).
var ErrUnsignedBid = errors.New("bid is not signed")

// VerifyBid checks that b, a bid in the auction auctionID in namespace, was signed by
// the node it names (NodeID, a server nkey), over its xkey and bidder id.
func VerifyBid(namespace, auctionID string, b AuctionResponse) error {
	if b.Sig == "" {
		return ErrUnsignedBid
	}
	if !nkeys.IsValidPublicServerKey(b.NodeID) {
		return fmt.Errorf("bid names node %q, which is not a server nkey", b.NodeID)
	}
	sig, err := base64.StdEncoding.DecodeString(b.Sig)
	if err != nil {
		return fmt.Errorf("bid signature is not base64: %w", err)
	}
	kp, err := nkeys.FromPublicKey(b.NodeID)
	if err != nil {
		return fmt.Errorf("bid node id %q: %w", b.NodeID, err)
	}
	if err := kp.Verify(BidPayload(namespace, auctionID, b), sig); err != nil {
		return fmt.Errorf("bid signature does not verify with node id %s", b.NodeID)
	}
	return nil
}
