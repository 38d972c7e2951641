package cli

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nats-io/nkeys"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.yaml.in/yaml/v3"

	"github.com/nexd-project/nexd/protocol"
)

// nexfileName is auto-loaded from the current directory, as upstream does, when no
// other source of a start request is given.
const nexfileName = "Nexfile"

// nexfile describes a workload; keys as upstream's.
type nexfile struct {
	Name         string            `json:"name" yaml:"name"`
	Description  string            `json:"description" yaml:"description"`
	Tags         map[string]string `json:"tags" yaml:"tags"`
	Type         string            `json:"type" yaml:"type"`
	Lifecycle    string            `json:"lifecycle" yaml:"lifecycle"`
	StartRequest any               `json:"start_request" yaml:"start_request"`
}

// parseNexfile reads JSON (when the document starts with '{') or YAML, rejecting
// unknown keys so a typo does not silently drop a setting.
func parseNexfile(name string, data []byte) (nexfile, error) {
	var nf nexfile
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nf, fmt.Errorf("the Nexfile %s is empty", name)
	}
	if trimmed[0] == '{' {
		dec := json.NewDecoder(bytes.NewReader(trimmed))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&nf); err != nil {
			return nf, fmt.Errorf("the Nexfile %s (JSON): %w", name, err)
		}
	} else {
		dec := yaml.NewDecoder(bytes.NewReader(trimmed))
		dec.KnownFields(true)
		if err := dec.Decode(&nf); err != nil {
			return nf, fmt.Errorf("the Nexfile %s (YAML): %w", name, err)
		}
	}
	if nf.StartRequest != nil {
		if _, ok := nf.StartRequest.(map[string]any); !ok {
			return nf, fmt.Errorf("the Nexfile %s: start_request must be an object, got %T", name, nf.StartRequest)
		}
		if err := jsonValue("start_request", nf.StartRequest); err != nil {
			return nf, fmt.Errorf("the Nexfile %s: %w", name, err)
		}
	}
	return nf, nil
}

// jsonValue checks that v, decoded from YAML, has a JSON form: the start request goes
// to the node as JSON, and YAML also has keys that are not strings (`1: x`) and
// numbers JSON has not (.nan, .inf), which json.Marshal refused later with no word of
// where they were. path names v in the error.
func jsonValue(path string, v any) error {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if err := jsonValue(path+"."+k, e); err != nil {
				return err
			}
		}
	case []any:
		for i, e := range v {
			if err := jsonValue(fmt.Sprintf("%s[%d]", path, i), e); err != nil {
				return err
			}
		}
	case map[any]any:
		for k := range v {
			if _, ok := k.(string); !ok {
				return fmt.Errorf("%s: key %v is not a string (quote it)", path, k)
			}
		}
	case float64:
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return fmt.Errorf("%s: %v is not a JSON number", path, v)
		}
	}
	return nil
}

// runSpec is everything needed to start a workload except the bidder-specific parts.
type runSpec struct {
	Name, Description, Type string
	Lifecycle               protocol.Lifecycle
	Tags                    map[string]string
	Start                   map[string]any    // the nexlet's start request (run_request)
	Env                     map[string]string // sealed per bidder unless PlainEnv
	PlainEnv                bool
	// CloneOf is the workload a clone copies when its environment is sealed: the node
	// running it re-seals the environment for each bid's nexlet (a signed bid only).
	CloneOf string
}

// shortFormStart builds a native start request from a command line: the program is
// resolved to an absolute path (via PATH when it has no slash).
func shortFormStart(argv []string) (map[string]any, error) {
	prog := argv[0]
	if !strings.Contains(prog, "/") {
		p, err := exec.LookPath(prog)
		if err != nil {
			return nil, fmt.Errorf("command %q: %w", prog, err)
		}
		prog = p
	}
	abs, err := filepath.Abs(prog)
	if err != nil {
		return nil, fmt.Errorf("command %q: %w", prog, err)
	}
	if _, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("command %q: %w", prog, err)
	}
	args := make([]any, 0, len(argv)-1)
	for _, s := range argv[1:] {
		args = append(args, s)
	}
	return map[string]any{"uri": "file://" + abs, "argv": args}, nil
}

// schemaFor compiles a bid's start request schema; nil when the bid has none.
func schemaFor(bid protocol.AuctionResponse) (*jsonschema.Schema, map[string]any, error) {
	if strings.TrimSpace(bid.StartRequestSchema) == "" {
		return nil, nil, nil
	}
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(bid.StartRequestSchema))
	if err != nil {
		return nil, nil, fmt.Errorf("bid's start request schema is not JSON: %w", err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("start_request.json", doc); err != nil {
		return nil, nil, fmt.Errorf("bid's start request schema: %w", err)
	}
	sch, err := c.Compile("start_request.json")
	if err != nil {
		return nil, nil, fmt.Errorf("bid's start request schema: %w", err)
	}
	obj, _ := doc.(map[string]any)
	return sch, obj, nil
}

func schemaHasProperty(doc map[string]any, name string) bool {
	props, _ := doc["properties"].(map[string]any)
	_, ok := props[name]
	return ok
}

// errNoSealing: the bidder's nexlet cannot take a sealed environment.
var errNoSealing = errors.New("its nexlet does not accept encrypted_environment; use --plain-env to send the environment in clear text")

// runRequestFor renders the start request for one bidder: the environment sealed for
// the bidder's xkey (or plain with --plain-env), validated against the bid's schema.
func (s runSpec) runRequestFor(bid protocol.AuctionResponse) (string, error) {
	start := make(map[string]any, len(s.Start)+1)
	for k, v := range s.Start {
		start[k] = v
	}
	sch, doc, err := schemaFor(bid)
	if err != nil {
		return "", err
	}
	if len(s.Env) > 0 {
		if s.PlainEnv {
			env := map[string]any{}
			if old, ok := start["environment"].(map[string]any); ok {
				for k, v := range old {
					env[k] = v
				}
			}
			for k, v := range s.Env {
				env[k] = v
			}
			start["environment"] = env
		} else {
			if doc != nil && !schemaHasProperty(doc, "encrypted_environment") {
				return "", errNoSealing
			}
			enc, err := sealEnv(s.Env, bid.XKey)
			if err != nil {
				return "", err
			}
			start["encrypted_environment"] = map[string]any{"base64_encrypted_env": enc.Base64EncryptedEnv, "encrypted_by": enc.EncryptedBy}
		}
	}
	if sch != nil {
		// Validate the JSON form, as the node will.
		b, err := json.Marshal(start)
		if err != nil {
			return "", err
		}
		inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
		if err != nil {
			return "", err
		}
		if err := sch.Validate(inst); err != nil {
			return "", fmt.Errorf("start request does not match the nexlet's schema: %w", err)
		}
	}
	b, err := json.Marshal(start)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// sealEnv encrypts env for recipient (a curve public key) with a fresh ephemeral key,
// so only the recipient's nexlet can open it.
func sealEnv(env map[string]string, recipient string) (protocol.EncEnv, error) {
	if !nkeys.IsValidPublicCurveKey(recipient) {
		return protocol.EncEnv{}, fmt.Errorf("bid xkey %q is not a curve public key; cannot seal the environment", recipient)
	}
	kp, err := nkeys.CreateCurveKeys()
	if err != nil {
		return protocol.EncEnv{}, err
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil {
		return protocol.EncEnv{}, err
	}
	plain, err := json.Marshal(env)
	if err != nil {
		return protocol.EncEnv{}, err
	}
	sealed, err := kp.Seal(plain, recipient)
	if err != nil {
		return protocol.EncEnv{}, fmt.Errorf("seal environment: %w", err)
	}
	return protocol.EncEnv{Base64EncryptedEnv: base64.StdEncoding.EncodeToString(sealed), EncryptedBy: pub}, nil
}

// openEnv reverses sealEnv with the recipient's key pair.
func openEnv(kp nkeys.KeyPair, enc protocol.EncEnv) (map[string]string, error) {
	data, err := base64.StdEncoding.DecodeString(enc.Base64EncryptedEnv)
	if err != nil {
		return nil, fmt.Errorf("base64_encrypted_env: %w", err)
	}
	plain, err := kp.Open(data, enc.EncryptedBy)
	if err != nil {
		return nil, err
	}
	var env map[string]string
	if err := json.Unmarshal(plain, &env); err != nil {
		return nil, fmt.Errorf("sealed environment: %w", err)
	}
	return env, nil
}

// orderBids keeps the bids whose nexlet supports lifecycle, least-loaded first (the
// nexd_workload_count extension; upstream bids count as 0 and keep arrival order).
func orderBids(bids []protocol.AuctionResponse, lifecycle protocol.Lifecycle) (usable []protocol.AuctionResponse, skipped int) {
	for _, b := range bids {
		ok := len(b.SupportedLifecycles) == 0
		for _, l := range b.SupportedLifecycles {
			if l == lifecycle {
				ok = true
			}
		}
		if ok {
			usable = append(usable, b)
		} else {
			skipped++
		}
	}
	sort.SliceStable(usable, func(i, j int) bool { return usable[i].WorkloadCount < usable[j].WorkloadCount })
	return usable, skipped
}

// diagnoseNoBids explains an auction nobody bid in, from every node's tags.
func diagnoseNoBids(nodes []map[string]string, typ string, want map[string]string) string {
	if len(nodes) == 0 {
		return "no nodes answered; is a node running and reachable with these NATS credentials?"
	}
	var missing []string
	for _, kv := range sortedTags(want) {
		k, v, _ := strings.Cut(kv, "=")
		found := false
		for _, n := range nodes {
			if tv, ok := n[k]; ok && tv == v {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, kv)
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("no node offers tag(s) %s (%d node(s) answered)", strings.Join(missing, ", "), len(nodes))
	}
	matching, lameduck := 0, 0
	for _, n := range nodes {
		all := true
		for k, v := range want {
			if n[k] != v {
				all = false
				break
			}
		}
		if all {
			matching++
			if n[protocol.TagLameduck] == "true" {
				lameduck++
			}
		}
	}
	if matching == 0 {
		return fmt.Sprintf("no single node offers all of the tags %s", strings.Join(sortedTags(want), ", "))
	}
	msg := fmt.Sprintf("no node has a healthy nexlet of type %q", typ)
	if len(want) > 0 {
		msg = fmt.Sprintf("none of the %d node(s) with tags %s has a healthy nexlet of type %q", matching, strings.Join(sortedTags(want), ", "), typ)
	}
	if lameduck > 0 {
		msg += fmt.Sprintf("; %d of them in lame duck mode", lameduck)
	}
	return msg
}
