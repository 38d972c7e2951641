package cli

import (
	"encoding/json"
	"strings"
	"testing"
)

// FuzzParseNexfile parses arbitrary Nexfiles, JSON and YAML, as nexctl does a user's:
// no panic, every error names the file, and a start request accepted is an object that
// goes out as JSON (what nexctl sends the node).
func FuzzParseNexfile(f *testing.F) {
	for _, s := range []string{
		`{"name":"web","type":"native","lifecycle":"service","tags":{"a":"b"},"start_request":{"uri":"file:///bin/true"}}`,
		"name: web\ntype: native\nlifecycle: job\nstart_request:\n  uri: file:///bin/true\n  argv: [\"-x\"]\n",
		`{"name":"web","tpye":"native"}`,
		"name: web\ntpye: native\n",
		`{"name":"web","start_request":"run it"}`,
		"start_request:\n  limits:\n    1: 2\n",
		"start_request:\n  a: &x [1, 2]\n  b: *x\n",
		`{"name":`,
		"  \n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		nf, err := parseNexfile("Nexfile.fz", data)
		if err != nil {
			if !strings.Contains(err.Error(), "Nexfile.fz") {
				t.Fatalf("%q: error %q does not name the file", data, err)
			}
			return
		}
		if nf.StartRequest == nil {
			return
		}
		if _, ok := nf.StartRequest.(map[string]any); !ok {
			t.Fatalf("%q: start_request accepted as %T", data, nf.StartRequest)
		}
		if _, err := json.Marshal(nf.StartRequest); err != nil {
			t.Fatalf("%q: start_request accepted but cannot be sent: %v", data, err)
		}
	})
}
