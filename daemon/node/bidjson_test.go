package node

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"

	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// TestBidEncodingIsJSONMarshal: a bid encoded from its fixed part (bidStatic,
// appendBid) is byte for byte what json.Marshal makes of the same AuctionResponse with
// the schema compacted, and its schema is the registered one as JSON.
func TestBidEncodingIsJSONMarshal(t *testing.T) {
	all := []protocol.Lifecycle{protocol.LifecycleService, protocol.LifecycleJob, protocol.LifecycleFunction}
	for _, c := range []struct {
		name, schema   string
		lifecycles     []protocol.Lifecycle
		xkey, nodeName string
		workloads      int
		sig            string
	}{
		{"native", native.StartRequestSchema, all, "XAXKEY", "node-1", 3, "q+/Zm9vYmFy=="},
		{"compact", testSchema, []protocol.Lifecycle{protocol.LifecycleJob}, "", "n", 0, ""},
		{"escapes", "{\n  \"description\": \"<a> & \\\"b\\\" \\u00e9 \u2028 é\",\n\t\"type\": \"object\"\n}", all, "X", "name with \"quotes\" & <tags>", 1, "c2ln"},
		{"not json", "not a schema {", all, "X", "n", 2, "c2ln"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := appendBid(nil, "a1B2c3D4e5F6g7H8i9J0kl", bidStatic(c.schema, c.lifecycles, c.xkey, "NODEID", c.nodeName), c.workloads, c.sig)
			compact := c.schema
			var buf bytes.Buffer
			if json.Compact(&buf, []byte(c.schema)) == nil {
				compact = buf.String()
			}
			want, err := json.Marshal(protocol.AuctionResponse{BidderID: "a1B2c3D4e5F6g7H8i9J0kl", StartRequestSchema: compact,
				SupportedLifecycles: c.lifecycles, XKey: c.xkey, NodeID: "NODEID", NodeName: c.nodeName, WorkloadCount: c.workloads, Sig: c.sig})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("bid encoding\n got %s\nwant %s", got, want)
			}
			var b protocol.AuctionResponse
			if err := protocol.Decode(got, &b); err != nil {
				t.Fatalf("decode: %v", err)
			}
			var sent, registered any
			if json.Unmarshal([]byte(b.StartRequestSchema), &sent) == nil {
				if err := json.Unmarshal([]byte(c.schema), &registered); err != nil || !reflect.DeepEqual(sent, registered) {
					t.Fatalf("schema sent %s is not the registered %s as JSON", b.StartRequestSchema, c.schema)
				}
			} else if b.StartRequestSchema != c.schema {
				t.Fatalf("a schema that is no JSON went as %q, not as registered", b.StartRequestSchema)
			}
		})
	}
}
