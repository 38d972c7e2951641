package node

import (
	"bytes"
	"encoding/json"
	"strconv"

	"github.com/nexd-project/nexd/protocol"
)

// A bid's encoding is what json.Marshal makes of protocol.AuctionResponse, but most of
// it is fixed by the nexlet's registration and the node: the start request schema
// (the native nexlet's is 3.3 KB, most of the bid, and its escaping was a third of the
// node's CPU per auction), the lifecycles, the xkey, the node's id and name. That part
// is encoded once per registration (bidStatic); an auction appends its bidder id, the
// workload count and the signature around it (appendBid).

// bidStatic is the encoding of a bid's fields after bidder_id that the registration
// and the node fix: `,"start_request_schema":…` up to the node name, without the
// closing brace. The schema goes without insignificant whitespace (json.Compact):
// the same JSON, a fifth smaller for the native nexlet's, for the node to send and
// every client to decode.
func bidStatic(schema string, lifecycles []protocol.Lifecycle, xkey, nodeID, nodeName string) []byte {
	var c bytes.Buffer
	if json.Compact(&c, []byte(schema)) == nil {
		schema = c.String()
	}
	b, err := json.Marshal(protocol.AuctionResponse{StartRequestSchema: schema, SupportedLifecycles: lifecycles,
		XKey: xkey, NodeID: nodeID, NodeName: nodeName})
	if err != nil { // strings and a string slice: cannot fail
		return nil
	}
	// `{"bidder_id":""` … `}`: what lies between is the fixed part.
	head := len(`{"bidder_id":""`)
	return b[head : len(b)-1]
}

// appendBid appends a bid's encoding: bidder id, the fixed part, workload count and
// signature (both omitted when zero, as json.Marshal does). The bidder id (randid)
// and the signature (base64) need no escaping.
func appendBid(dst []byte, bidderID string, static []byte, workloads int, sig string) []byte {
	dst = append(dst, `{"bidder_id":"`...)
	dst = append(dst, bidderID...)
	dst = append(dst, '"')
	dst = append(dst, static...)
	if workloads != 0 {
		dst = append(dst, `,"nexd_workload_count":`...)
		dst = strconv.AppendInt(dst, int64(workloads), 10)
	}
	if sig != "" {
		dst = append(dst, `,"nexd_sig":"`...)
		dst = append(dst, sig...)
		dst = append(dst, '"')
	}
	return append(dst, '}')
}
