package node

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// Nexlets register start request schemas of any draft the validator knows (upstream's
// and third parties' may be older than 2020-12). The vendored validator compiles a
// draft's meta-schemas on its first use (third_party/jsonschema/NOTICE), so each draft
// is compiled here from several goroutines at once: under -race that checks the lazy
// initialisation, and every draft must still reject what its keywords forbid.
func TestStartRequestSchemaDrafts(t *testing.T) {
	drafts := []struct {
		name, uri string
		// tuple is how the draft says "a two-item array of string then integer"
		// (items as an array before 2020-12, prefixItems since).
		tuple string
	}{
		{"draft-04", "http://json-schema.org/draft-04/schema#", `"items":[{"type":"string"},{"type":"integer"}]`},
		{"draft-06", "http://json-schema.org/draft-06/schema#", `"items":[{"type":"string"},{"type":"integer"}]`},
		{"draft-07", "http://json-schema.org/draft-07/schema#", `"items":[{"type":"string"},{"type":"integer"}]`},
		{"2019-09", "https://json-schema.org/draft/2019-09/schema", `"items":[{"type":"string"},{"type":"integer"}]`},
		{"2020-12", "https://json-schema.org/draft/2020-12/schema", `"prefixItems":[{"type":"string"},{"type":"integer"}]`},
	}
	const goroutines = 4
	var wg sync.WaitGroup
	errs := make(chan error, len(drafts)*goroutines)
	for _, d := range drafts {
		schema := fmt.Sprintf(`{"$schema":%q,"type":"object","required":["cmd"],"properties":{"cmd":{"type":"string","minLength":1},"pair":{"type":"array",%s}},"additionalProperties":false}`, d.uri, d.tuple)
		for g := range goroutines {
			wg.Go(func() {
				s, err := compileSchema(fmt.Sprintf("a%d", g), schema)
				if err != nil {
					errs <- fmt.Errorf("%s: compile: %w", d.name, err)
					return
				}
				if err := validateRunRequest(s, `{"cmd":"/bin/true","pair":["x",1]}`); err != nil {
					errs <- fmt.Errorf("%s: a valid request refused: %w", d.name, err)
				}
				for _, bad := range []string{`{}`, `{"cmd":""}`, `{"cmd":"x","other":1}`, `{"cmd":"x","pair":[1,"x"]}`} {
					if err := validateRunRequest(s, bad); err == nil || !strings.Contains(err.Error(), "does not match") {
						errs <- fmt.Errorf("%s: %s: want a schema mismatch, got %v", d.name, bad, err)
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A schema that breaks its draft's meta-schema is refused at registration, in every
// draft: the meta-schemas, compiled lazily now, are still applied.
func TestStartRequestSchemaMetaChecked(t *testing.T) {
	for _, uri := range []string{
		"http://json-schema.org/draft-04/schema#",
		"http://json-schema.org/draft-07/schema#",
		"https://json-schema.org/draft/2020-12/schema",
	} {
		_, err := compileSchema("meta", fmt.Sprintf(`{"$schema":%q,"type":"object","properties":{"cmd":{"type":"strnig"}}}`, uri))
		if err == nil {
			t.Errorf("%s: a schema with type \"strnig\" compiled", uri)
		}
	}
}

// The native nexlet's schema is one nexd registers without compiling it
// (Options.KnownSchemas): it must compile.
func TestNativeSchemaCompiles(t *testing.T) {
	if _, err := compileSchema("native", native.StartRequestSchema); err != nil {
		t.Fatalf("the native nexlet's start request schema does not compile: %v", err)
	}
}

// registered returns agentID's registration.
func registered(t *testing.T, n *Node, agentID string) *registration {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	a, ok := n.agents[agentID]
	if !ok {
		t.Fatalf("agent %s not registered", agentID)
	}
	return a
}

// A known schema is registered without being compiled: the first deploy compiles it
// (and validates against it), or CompileSchemas, whichever comes first. Any other
// schema is compiled at registration.
func TestKnownSchemaCompiledLater(t *testing.T) {
	f := newFixture(t, 2, func(i int, o *Options) {
		if i == 0 {
			o.KnownSchemas = []string{testSchema}
		}
	})
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	if registered(t, n, "agent0").schema.done.Load() {
		t.Fatalf("a known schema was compiled at registration")
	}
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "w", `{"n":1}`))
	if code, body := errorReply(t, m); code != "400" || !strings.Contains(body.Error, "cmd") {
		t.Errorf("a run_request without cmd: got %s %q, want 400 naming cmd", code, body.Error)
	}
	if !registered(t, n, "agent0").schema.done.Load() {
		t.Errorf("the first deploy did not compile the known schema")
	}
	f.deployOne("tenant")

	f.healthyAgent(n, "agent1", "go_exec2", "native", nil)
	if registered(t, n, "agent1").schema.done.Load() {
		t.Fatalf("a known schema was compiled at registration")
	}
	n.CompileSchemas()
	if !registered(t, n, "agent1").schema.done.Load() {
		t.Errorf("CompileSchemas left a known schema uncompiled")
	}

	f.healthyAgent(f.nodes[1], "agent2", "go_exec", "native", nil)
	if !registered(t, f.nodes[1], "agent2").schema.done.Load() {
		t.Errorf("a schema not known to the node was not compiled at registration")
	}
}

// A known schema that does not compile after all refuses each deploy with the error.
func TestKnownSchemaThatDoesNotCompile(t *testing.T) {
	s := &startSchema{agentID: "a", text: `{"type":"strnig"}`}
	if _, err := s.get(); err == nil {
		t.Fatalf("a schema with type \"strnig\" compiled")
	}
	if _, err := s.get(); err == nil {
		t.Fatalf("the second use forgot the error")
	}
}
