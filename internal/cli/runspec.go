package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"sort"
	"strings"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// The pure halves of workload run, workload clone and node lameduck: what the commands
// were told in, the request to send out, no I/O, so every combination is table-tested.

// runFlags are workload run's flags; Changed names the ones given on the command line
// ("name", "description", "type", "lifecycle", "start-request").
type runFlags struct {
	Name, Description, Type, Lifecycle string
	StartJSON                          string
	Tags, Env                          map[string]string
	PlainEnv                           bool
	Bids                               int
	Changed                            map[string]bool
}

// runInputs are everything workload run merges.
type runInputs struct {
	File     *nexfile // the Nexfile, nil without one
	FileName string
	Flags    runFlags
	// Command is what follows '--'; CommandStart is its native start request (the
	// caller resolves the program on PATH).
	Command      []string
	CommandStart map[string]any
}

// pickNexfile says which Nexfile to read: the explicit one, or ./Nexfile when it
// exists and nothing else says what to run.
func pickNexfile(explicit string, startGiven bool, nargs int, exists func(string) bool) string {
	if explicit != "" || startGiven || nargs > 0 {
		return explicit
	}
	if exists(nexfileName) {
		return nexfileName
	}
	return ""
}

// mergeRunSpec builds the run spec: the Nexfile first, then flags and the command
// override it (upstream lets the file win; its docs promise the opposite, which is what
// users expect). Map flags (--tags) add to the file's map.
func mergeRunSpec(in runInputs) (runSpec, error) {
	fl := in.Flags
	spec := runSpec{Env: fl.Env, PlainEnv: fl.PlainEnv}
	if f := in.File; f != nil {
		spec.Name, spec.Description, spec.Type, spec.Lifecycle = f.Name, f.Description, f.Type, protocol.Lifecycle(f.Lifecycle)
		spec.Tags = maps.Clone(f.Tags)
		if m, ok := f.StartRequest.(map[string]any); ok {
			spec.Start = maps.Clone(m)
		}
	}
	if fl.Changed["start-request"] {
		var m map[string]any
		if err := json.Unmarshal([]byte(fl.StartJSON), &m); err != nil {
			return runSpec{}, usagef("--start-request must be a JSON object: %v", err)
		}
		if m == nil { // JSON null decodes without an error, which said "<nil>"
			return runSpec{}, usagef("--start-request must be a JSON object, got null")
		}
		spec.Start = m
	}
	if len(in.Command) > 0 {
		if spec.Start == nil {
			spec.Start = map[string]any{}
		}
		maps.Copy(spec.Start, in.CommandStart)
		if spec.Name == "" && !fl.Changed["name"] {
			spec.Name = baseName(in.Command[0])
		}
	}
	if fl.Changed["name"] || spec.Name == "" {
		spec.Name = fl.Name
	}
	if fl.Changed["description"] {
		spec.Description = fl.Description
	}
	if fl.Changed["type"] || spec.Type == "" {
		spec.Type = fl.Type
	}
	if fl.Changed["lifecycle"] || spec.Lifecycle == "" {
		spec.Lifecycle = protocol.Lifecycle(fl.Lifecycle)
	}
	if spec.Tags == nil {
		spec.Tags = map[string]string{}
	}
	maps.Copy(spec.Tags, fl.Tags)
	switch {
	case spec.Start == nil:
		return runSpec{}, usagef("nothing to run: give -f Nexfile, --start-request JSON, or a command after '--'")
	case spec.Name == "":
		return runSpec{}, usagef("--name is required")
	case !spec.Lifecycle.Valid():
		return runSpec{}, usagef("--lifecycle %q is not one of service, job, function", spec.Lifecycle)
	case fl.Bids < 0:
		return runSpec{}, usagef("--bids must not be negative")
	}
	return spec, nil
}

func baseName(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[i+1:]
	}
	return p
}

// cloneSpec turns a workload's start request into the spec for its copy: the same
// name, type, lifecycle and start request, with tags replaced by --tags. A sealed
// environment is opened with open (it was re-sealed for this client) and sealed again
// for the new nexlet; when it cannot be opened it is passed on as is and warn says so.
func cloneSpec(swr protocol.StartWorkloadRequest, tags map[string]string, open func(protocol.EncEnv) (map[string]string, error)) (spec runSpec, warn string, err error) {
	if swr.Namespace == "" {
		return runSpec{}, "", fmt.Errorf("its nexlet did not report its namespace")
	}
	spec = runSpec{Name: swr.Name, Description: swr.Description, Type: swr.WorkloadType,
		Lifecycle: swr.WorkloadLifecycle, Tags: maps.Clone(tags)}
	if spec.Tags == nil {
		spec.Tags = map[string]string{}
	}
	dec := json.NewDecoder(bytes.NewReader([]byte(swr.RunRequest)))
	dec.UseNumber()
	if err := dec.Decode(&spec.Start); err != nil {
		return runSpec{}, "", fmt.Errorf("it has an unreadable start request: %w", err)
	}
	if spec.Start == nil {
		return runSpec{}, "", fmt.Errorf("it has no start request (%q)", swr.RunRequest)
	}
	raw, ok := spec.Start["encrypted_environment"]
	if !ok {
		return spec, "", nil
	}
	b, _ := json.Marshal(raw)
	var enc protocol.EncEnv
	if json.Unmarshal(b, &enc) != nil {
		return spec, "", nil
	}
	env, err := open(enc)
	if err != nil {
		return spec, "the sealed environment was not re-sealed for this client; the clone gets it as is and its new nexlet may not open it", nil
	}
	delete(spec.Start, "encrypted_environment")
	spec.Env = env
	return spec, "", nil
}

// lameduckPlan is whom node lameduck drains: one named node, or (ByTag) every node
// whose tags match Tags.
type lameduckPlan struct {
	NodeID string
	ByTag  bool
	Delay  time.Duration
	Tags   map[string]string
}

// planLameduck checks node lameduck's arguments: the node named positionally or with
// --node-id (not both, differently), or --tag alone.
func planLameduck(args []string, nodeIDFlag string, delay time.Duration, tags map[string]string) (lameduckPlan, error) {
	id := nodeIDFlag
	if len(args) == 1 {
		if id != "" && id != args[0] {
			return lameduckPlan{}, usagef("node id given twice: %q and --node-id %q", args[0], id)
		}
		id = args[0]
	}
	if delay < 0 {
		return lameduckPlan{}, usagef("--delay %s must not be negative", delay)
	}
	if id == "" && len(tags) == 0 {
		return lameduckPlan{}, usagef("name a node (NODE_ID or --node-id) or select nodes with --tag")
	}
	return lameduckPlan{NodeID: id, ByTag: id == "", Delay: delay, Tags: tags}, nil
}

// lameduckTargets are the node ids a plan drains, sorted, given the nodes that
// answered a ping filtered by its tags.
func (p lameduckPlan) targets(matching []protocol.NodePingResponse) ([]string, error) {
	if !p.ByTag {
		return []string{p.NodeID}, nil
	}
	if len(matching) == 0 {
		return nil, fmt.Errorf("no node has tags %s", strings.Join(sortedTags(p.Tags), ","))
	}
	ids := make([]string, 0, len(matching))
	for _, n := range matching {
		ids = append(ids, n.NodeID)
	}
	sort.Strings(ids)
	return ids, nil
}
