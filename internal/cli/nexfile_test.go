package cli

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

func TestParseNexfile(t *testing.T) {
	tests := []struct {
		name, data string
		wantName   string
		wantURI    string
		err        string
	}{
		{"json", `{"name":"web","type":"native","lifecycle":"service","tags":{"a":"b"},"start_request":{"uri":"file:///bin/true"}}`, "web", "file:///bin/true", ""},
		{"yaml", "name: web\ntype: native\nlifecycle: job\nstart_request:\n  uri: file:///bin/true\n  argv: [\"-x\"]\n", "web", "file:///bin/true", ""},
		{"json unknown key", `{"name":"web","tpye":"native"}`, "", "", `unknown field "tpye"`},
		{"yaml unknown key", "name: web\ntpye: native\n", "", "", "tpye"},
		{"bad start request", `{"name":"web","start_request":"run it"}`, "", "", "must be an object"},
		{"empty", "  \n", "", "", "empty"},
		{"broken json", `{"name":`, "", "", "JSON"},
		// YAML that JSON cannot carry is refused where it is, not at the send with no
		// word of where (FuzzParseNexfile: "json: unsupported type: map[interface {}]interface {}").
		{"yaml key not a string", "start_request:\n  uri: file:///bin/true\n  limits:\n    1: 2\n", "", "", "start_request.limits: key 1 is not a string"},
		{"yaml nan", "start_request:\n  argv: [a, .nan]\n", "", "", "start_request.argv[1]: NaN is not a JSON number"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nf, err := parseNexfile("Nexfile", []byte(tt.data))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			sr, _ := nf.StartRequest.(map[string]any)
			if nf.Name != tt.wantName || sr["uri"] != tt.wantURI {
				t.Fatalf("got %+v", nf)
			}
		})
	}
}

// nativeSchema mirrors the native nexlet's start request schema with nexd's extension.
const nativeSchema = `{"type":"object","required":["uri"],"properties":{
 "uri":{"type":"string"},"argv":{"type":"array","items":{"type":"string"}},
 "environment":{"type":"object","additionalProperties":{"type":"string"}},
 "encrypted_environment":{"type":"object","required":["base64_encrypted_env","encrypted_by"],
   "properties":{"base64_encrypted_env":{"type":"string"},"encrypted_by":{"type":"string"}}}}}`

const upstreamSchema = `{"type":"object","required":["uri"],"properties":{"uri":{"type":"string"},"environment":{"type":"object"}}}`

func TestRunRequestFor(t *testing.T) {
	nexlet, err := nkeys.CreateCurveKeys()
	if err != nil {
		t.Fatal(err)
	}
	xpub, _ := nexlet.PublicKey()
	spec := runSpec{Start: map[string]any{"uri": "file:///bin/sleep", "argv": []any{"1"}}, Env: map[string]string{"TOKEN": "s3cret"}}

	// Sealed: only the bidder's nexlet can open it, and the clear value is nowhere.
	rr, err := spec.runRequestFor(protocol.AuctionResponse{XKey: xpub, StartRequestSchema: nativeSchema})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(rr, "s3cret") {
		t.Fatalf("sealed run request holds the clear value: %s", rr)
	}
	var got struct {
		Environment map[string]string `json:"environment"`
		Enc         protocol.EncEnv   `json:"encrypted_environment"`
	}
	if err := json.Unmarshal([]byte(rr), &got); err != nil {
		t.Fatal(err)
	}
	if got.Environment != nil {
		t.Fatalf("sealed request also has a plain environment: %s", rr)
	}
	env, err := openEnv(nexlet, got.Enc)
	if err != nil || env["TOKEN"] != "s3cret" {
		t.Fatalf("nexlet opened %v, %v", env, err)
	}
	other, _ := nkeys.CreateCurveKeys()
	if _, err := openEnv(other, got.Enc); err == nil {
		t.Fatal("another key opened the sealed environment")
	}
	if _, ok := spec.Start["encrypted_environment"]; ok {
		t.Fatal("runRequestFor changed the spec's start request")
	}

	// A nexlet without encrypted_environment in its schema is refused, unless plain.
	if _, err := spec.runRequestFor(protocol.AuctionResponse{XKey: xpub, StartRequestSchema: upstreamSchema}); err != errNoSealing {
		t.Fatalf("upstream schema: err = %v, want errNoSealing", err)
	}
	plain := spec
	plain.PlainEnv = true
	rr, err = plain.runRequestFor(protocol.AuctionResponse{XKey: xpub, StartRequestSchema: upstreamSchema})
	if err != nil || !strings.Contains(rr, `"environment":{"TOKEN":"s3cret"}`) {
		t.Fatalf("plain env: %s, %v", rr, err)
	}

	// Schema validation happens before anything is sent.
	bad := runSpec{Start: map[string]any{"argv": []any{"1"}}}
	if _, err := bad.runRequestFor(protocol.AuctionResponse{XKey: xpub, StartRequestSchema: nativeSchema}); err == nil || !strings.Contains(err.Error(), "uri") {
		t.Fatalf("missing uri: err = %v", err)
	}
	if _, err := spec.runRequestFor(protocol.AuctionResponse{XKey: "not-a-key", StartRequestSchema: nativeSchema}); err == nil {
		t.Fatal("sealed for an invalid xkey")
	}
}

func TestOrderBids(t *testing.T) {
	bids := []protocol.AuctionResponse{
		{BidderID: "busy", WorkloadCount: 9, SupportedLifecycles: []protocol.Lifecycle{"service", "job"}},
		{BidderID: "upstream", SupportedLifecycles: []protocol.Lifecycle{"service"}},
		{BidderID: "jobs-only", WorkloadCount: 0, SupportedLifecycles: []protocol.Lifecycle{"job"}},
		{BidderID: "idle", WorkloadCount: 1, SupportedLifecycles: []protocol.Lifecycle{"service"}},
	}
	usable, skipped := orderBids(bids, protocol.LifecycleService)
	var ids []string
	for _, b := range usable {
		ids = append(ids, b.BidderID)
	}
	if strings.Join(ids, ",") != "upstream,idle,busy" || skipped != 1 {
		t.Fatalf("order = %v, skipped %d", ids, skipped)
	}
}

func TestDiagnoseNoBids(t *testing.T) {
	nodes := []map[string]string{
		{"region": "lab", "gpu": "no"},
		{"region": "prod", "gpu": "yes", protocol.TagLameduck: "true"},
	}
	tests := []struct {
		nodes []map[string]string
		tags  map[string]string
		want  string
	}{
		{nil, nil, "no nodes answered"},
		{nodes, map[string]string{"region": "moon", "gpu": "yes", "zone": "a"}, "no node offers tag(s) region=moon, zone=a"},
		{nodes, map[string]string{"region": "lab", "gpu": "yes"}, "no single node offers all of the tags gpu=yes, region=lab"},
		{nodes, nil, `no node has a healthy nexlet of type "native"`},
		{nodes, map[string]string{"region": "prod"}, `none of the 1 node(s) with tags region=prod has a healthy nexlet of type "native"; 1 of them in lame duck mode`},
	}
	for _, tt := range tests {
		if got := diagnoseNoBids(tt.nodes, "native", tt.tags); !strings.Contains(got, tt.want) {
			t.Errorf("diagnoseNoBids(%v) = %q, want %q", tt.tags, got, tt.want)
		}
	}
}

func TestShortFormStart(t *testing.T) {
	sr, err := shortFormStart([]string{"sh", "-c", "echo hi"})
	if err != nil {
		t.Fatal(err)
	}
	uri, _ := sr["uri"].(string)
	if !strings.HasPrefix(uri, "file:///") || !strings.HasSuffix(uri, "/sh") {
		t.Fatalf("uri = %q", uri)
	}
	if argv, _ := sr["argv"].([]any); len(argv) != 2 || argv[1] != "echo hi" {
		t.Fatalf("argv = %v", sr["argv"])
	}
	if _, err := shortFormStart([]string{"/no/such/binary"}); err == nil {
		t.Fatal("accepted a missing binary")
	}
}
