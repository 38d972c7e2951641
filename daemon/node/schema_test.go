package node

import (
	"fmt"
	"strings"
	"sync"
	"testing"
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
