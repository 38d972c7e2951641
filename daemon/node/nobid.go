package node

// noBid is why the node did not bid on an auction it took off the queue. Each has an
// atomic counter (Node.noBids): the auction path counts without a lock or an allocation.
type noBid uint8

const (
	noBidBadRequest   noBid = iota // the request did not decode, or named no valid lifecycle
	noBidStateStore                // Options.CanBid refused: the state store cannot be written
	noBidDraining                  // lame duck or stopping
	noBidTags                      // the auction's tags do not match the node's
	noBidNoNexlet                  // no healthy nexlet of the type
	noBidLifecycle                 // its nexlets of the type do not run the lifecycle
	noBidMaxWorkloads              // its nexlets of the type are at their max_workloads
	noBidCredentials               // the namespace's workload credentials would not fit the control line
	noBidReasons                   // how many
)

// Reasons NotBid reports besides the noBid ones: the auctions the queue dropped and
// those refused at intake (AuctionDrops counts both by namespace).
const (
	NotBidNamespace = "namespace" // the subject's namespace is not valid (AuctionDropsInvalid)
	NotBidDropped   = "dropped"   // dropped unanswered: the node could not keep up (every other AuctionDrops key)
	NotBidTooLarge  = "too_large" // body and headers over auctionMaxBytes (counted in AuctionDrops too)
)

// String is the reason's label in nexd_auctions_not_bid_total and nexctl.
func (r noBid) String() string {
	switch r {
	case noBidBadRequest:
		return "bad_request"
	case noBidStateStore:
		return "state_store"
	case noBidDraining:
		return "draining"
	case noBidTags:
		return "tags"
	case noBidNoNexlet:
		return "no_nexlet"
	case noBidLifecycle:
		return "lifecycle"
	case noBidMaxWorkloads:
		return "max_workloads"
	case noBidCredentials:
		return "credentials"
	}
	return "unknown"
}

// notBid counts an auction the node did not bid on.
func (n *Node) notBid(r noBid) { n.noBids[r].Add(1) }

// NotBid returns how many auctions the node did not bid on since it was built, by
// reason: every reason, 0 included, so that a dashboard sees each series.
func (n *Node) NotBid() map[string]uint64 {
	out := make(map[string]uint64, int(noBidReasons)+3)
	for r := range noBidReasons {
		out[r.String()] = n.noBids[r].Load()
	}
	out[NotBidNamespace], out[NotBidDropped] = 0, 0
	drops, tooLarge := n.auctionDrops()
	out[NotBidTooLarge] = tooLarge
	for ns, d := range drops {
		if ns == AuctionDropsInvalid {
			out[NotBidNamespace] += d
		} else {
			out[NotBidDropped] += d
		}
	}
	// An auction too large is refused, not dropped for want of time (before, it was
	// counted as dropped: a tenant's oversized auctions read as a node that cannot keep
	// up, TestNotBidCountedByReason).
	out[NotBidDropped] -= tooLarge
	return out
}
