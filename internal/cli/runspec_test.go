package cli

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

func TestMergeRunSpec(t *testing.T) {
	file := &nexfile{Name: "web", Description: "from file", Type: "oci", Lifecycle: "job",
		Tags: map[string]string{"region": "lab"}, StartRequest: map[string]any{"uri": "file:///bin/web", "argv": []any{"-p"}}}
	defaults := func(mod func(*runFlags)) runFlags {
		f := runFlags{Type: "native", Lifecycle: "service", Changed: map[string]bool{}}
		if mod != nil {
			mod(&f)
		}
		return f
	}
	cmdStart := map[string]any{"uri": "file:///usr/bin/python3", "argv": []any{"-m", "http.server"}}
	cases := []struct {
		name string
		in   runInputs
		want runSpec
		err  string
	}{
		{name: "nothing", in: runInputs{Flags: defaults(nil)}, err: "nothing to run"},
		{name: "file alone", in: runInputs{File: file, Flags: defaults(nil)},
			want: runSpec{Name: "web", Description: "from file", Type: "oci", Lifecycle: "job", Tags: map[string]string{"region": "lab"},
				Start: map[string]any{"uri": "file:///bin/web", "argv": []any{"-p"}}}},
		{name: "flags override the file", in: runInputs{File: file, Flags: defaults(func(f *runFlags) {
			f.Name, f.Description, f.Type, f.Lifecycle = "api", "flag", "native", "service"
			f.Changed = map[string]bool{"name": true, "description": true, "type": true, "lifecycle": true}
		})},
			want: runSpec{Name: "api", Description: "flag", Type: "native", Lifecycle: "service", Tags: map[string]string{"region": "lab"},
				Start: map[string]any{"uri": "file:///bin/web", "argv": []any{"-p"}}}},
		{name: "unset flags keep the file's values, not their defaults", in: runInputs{File: file, Flags: defaults(nil)},
			want: runSpec{Name: "web", Description: "from file", Type: "oci", Lifecycle: "job", Tags: map[string]string{"region": "lab"},
				Start: map[string]any{"uri": "file:///bin/web", "argv": []any{"-p"}}}},
		{name: "--tags add to the file's", in: runInputs{File: file, Flags: defaults(func(f *runFlags) {
			f.Tags = map[string]string{"region": "east", "tier": "front"}
		})},
			want: runSpec{Name: "web", Description: "from file", Type: "oci", Lifecycle: "job", Tags: map[string]string{"region": "east", "tier": "front"},
				Start: map[string]any{"uri": "file:///bin/web", "argv": []any{"-p"}}}},
		{name: "--start-request replaces the file's", in: runInputs{File: file, Flags: defaults(func(f *runFlags) {
			f.StartJSON, f.Changed = `{"uri":"file:///x"}`, map[string]bool{"start-request": true}
		})},
			want: runSpec{Name: "web", Description: "from file", Type: "oci", Lifecycle: "job", Tags: map[string]string{"region": "lab"},
				Start: map[string]any{"uri": "file:///x"}}},
		{name: "--start-request not an object", in: runInputs{Flags: defaults(func(f *runFlags) {
			f.Name, f.StartJSON, f.Changed = "x", `[1]`, map[string]bool{"start-request": true, "name": true}
		})}, err: "must be a JSON object"},
		{name: "--start-request null", in: runInputs{Flags: defaults(func(f *runFlags) {
			f.Name, f.StartJSON, f.Changed = "x", `null`, map[string]bool{"start-request": true, "name": true}
		})}, err: "must be a JSON object, got null"},
		{name: "command names the workload", in: runInputs{Command: []string{"/usr/bin/python3", "-m", "http.server"}, CommandStart: cmdStart, Flags: defaults(nil)},
			want: runSpec{Name: "python3", Type: "native", Lifecycle: "service", Tags: map[string]string{}, Start: cmdStart}},
		{name: "command with --name", in: runInputs{Command: []string{"/usr/bin/python3"}, CommandStart: cmdStart, Flags: defaults(func(f *runFlags) {
			f.Name, f.Changed = "web", map[string]bool{"name": true}
		})},
			want: runSpec{Name: "web", Type: "native", Lifecycle: "service", Tags: map[string]string{}, Start: cmdStart}},
		{name: "command over the file's start request", in: runInputs{File: file, Command: []string{"/usr/bin/python3"}, CommandStart: cmdStart, Flags: defaults(nil)},
			want: runSpec{Name: "web", Description: "from file", Type: "oci", Lifecycle: "job", Tags: map[string]string{"region": "lab"}, Start: cmdStart}},
		{name: "env and plain env pass through", in: runInputs{Command: []string{"x"}, CommandStart: cmdStart, Flags: defaults(func(f *runFlags) {
			f.Env, f.PlainEnv = map[string]string{"A": "1"}, true
		})},
			want: runSpec{Name: "x", Type: "native", Lifecycle: "service", Tags: map[string]string{}, Start: cmdStart, Env: map[string]string{"A": "1"}, PlainEnv: true}},
		{name: "bad lifecycle", in: runInputs{Command: []string{"x"}, CommandStart: cmdStart, Flags: defaults(func(f *runFlags) {
			f.Lifecycle, f.Changed = "forever", map[string]bool{"lifecycle": true}
		})}, err: `--lifecycle "forever"`},
		{name: "no name", in: runInputs{Flags: defaults(func(f *runFlags) {
			f.StartJSON, f.Changed = `{"uri":"file:///x"}`, map[string]bool{"start-request": true}
		})}, err: "--name is required"},
		{name: "negative bids", in: runInputs{Command: []string{"x"}, CommandStart: cmdStart, Flags: defaults(func(f *runFlags) { f.Bids = -1 })}, err: "--bids"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := mergeRunSpec(tc.in)
			if tc.err != "" {
				var ue usageError
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.As(err, &ue) {
					t.Fatalf("err %v, want a usage error about %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("spec\n got  %+v\n want %+v", got, tc.want)
			}
		})
	}
	// The file's maps are not changed by the merge.
	if file.Tags["region"] != "lab" || len(file.Tags) != 1 {
		t.Errorf("merge changed the Nexfile's tags: %v", file.Tags)
	}
}

func TestPickNexfile(t *testing.T) {
	yes := func(string) bool { return true }
	no := func(string) bool { return false }
	for _, tc := range []struct {
		explicit   string
		startGiven bool
		nargs      int
		exists     func(string) bool
		want       string
	}{
		{"", false, 0, yes, "Nexfile"},
		{"", false, 0, no, ""},
		{"my.yaml", false, 0, yes, "my.yaml"},
		{"", true, 0, yes, ""},
		{"", false, 2, yes, ""},
	} {
		if got := pickNexfile(tc.explicit, tc.startGiven, tc.nargs, tc.exists); got != tc.want {
			t.Errorf("pickNexfile(%q, %v, %d) = %q, want %q", tc.explicit, tc.startGiven, tc.nargs, got, tc.want)
		}
	}
}

func TestPlanLameduck(t *testing.T) {
	tag := map[string]string{"pool": "a"}
	cases := []struct {
		name    string
		args    []string
		flag    string
		delay   time.Duration
		tags    map[string]string
		want    lameduckPlan
		wantErr string
	}{
		{name: "positional", args: []string{"N1"}, delay: time.Minute, want: lameduckPlan{NodeID: "N1", Delay: time.Minute}},
		{name: "--node-id", flag: "N1", want: lameduckPlan{NodeID: "N1"}},
		{name: "both, same", args: []string{"N1"}, flag: "N1", want: lameduckPlan{NodeID: "N1"}},
		{name: "both, different", args: []string{"N1"}, flag: "N2", wantErr: "given twice"},
		{name: "tag only", tags: tag, want: lameduckPlan{ByTag: true, Tags: tag}},
		{name: "node filtered by tag", args: []string{"N1"}, tags: tag, want: lameduckPlan{NodeID: "N1", Tags: tag}},
		{name: "nothing", wantErr: "name a node"},
		{name: "negative delay", args: []string{"N1"}, delay: -time.Second, wantErr: "must not be negative"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := planLameduck(tc.args, tc.flag, tc.delay, tc.tags)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("plan %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
	p := lameduckPlan{ByTag: true, Tags: tag}
	if _, err := p.targets(nil); err == nil || !strings.Contains(err.Error(), "no node has tags pool=a") {
		t.Errorf("no matching node: %v", err)
	}
	ids, err := p.targets([]protocol.NodePingResponse{{NodeID: "NB"}, {NodeID: "NA"}})
	if err != nil || !reflect.DeepEqual(ids, []string{"NA", "NB"}) {
		t.Errorf("targets %v %v", ids, err)
	}
}

func TestCloneSpec(t *testing.T) {
	swr := protocol.StartWorkloadRequest{Name: "web", Namespace: "lab", WorkloadType: "native", WorkloadLifecycle: "service",
		Description: "d", Tags: map[string]string{"old": "x"},
		RunRequest: `{"uri":"file:///bin/web","port":8080,"encrypted_environment":{"base64_encrypted_env":"AAA","encrypted_by":"XK"}}`}
	opened := func(protocol.EncEnv) (map[string]string, error) { return map[string]string{"TOKEN": "t"}, nil }
	sealedElsewhere := func(protocol.EncEnv) (map[string]string, error) { return nil, errors.New("cannot open") }

	spec, warn, err := cloneSpec(swr, map[string]string{"new": "y"}, opened)
	if err != nil || warn != "" {
		t.Fatal(err, warn)
	}
	if spec.Name != "web" || spec.Type != "native" || spec.Lifecycle != "service" || !reflect.DeepEqual(spec.Tags, map[string]string{"new": "y"}) ||
		!reflect.DeepEqual(spec.Env, map[string]string{"TOKEN": "t"}) || spec.Start["encrypted_environment"] != nil || spec.Start["port"].(interface{ String() string }).String() != "8080" {
		t.Errorf("re-sealed clone: %+v", spec)
	}
	spec, warn, err = cloneSpec(swr, nil, sealedElsewhere)
	if err != nil || warn == "" || spec.Start["encrypted_environment"] == nil || spec.Env != nil || len(spec.Tags) != 0 {
		t.Errorf("sealed for someone else: %+v %q %v", spec, warn, err)
	}
	if _, _, err := cloneSpec(protocol.StartWorkloadRequest{RunRequest: "{}"}, nil, opened); err == nil || !strings.Contains(err.Error(), "namespace") {
		t.Errorf("no namespace: %v", err)
	}
	swr.RunRequest = "not json"
	if _, _, err := cloneSpec(swr, nil, opened); err == nil || !strings.Contains(err.Error(), "unreadable start request") {
		t.Errorf("bad run request: %v", err)
	}
	// JSON null decodes without an error: before, "unreadable start request: <nil>".
	for _, rr := range []string{"null", ""} {
		swr.RunRequest = rr
		if _, _, err := cloneSpec(swr, nil, opened); err == nil || strings.Contains(err.Error(), "<nil>") {
			t.Errorf("run request %q: %v", rr, err)
		}
	}
}
