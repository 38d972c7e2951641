package journalread

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestParse: journalctl -o json entries as nexd writes them become lines with their
// stream and time; binary lines and other output are skipped.
func TestParse(t *testing.T) {
	out := []byte(`{"__REALTIME_TIMESTAMP":"1764590400000001","MESSAGE":"workload output","LINE":"hello","NEXLET_STREAM":"stdout","NEX_WORKLOAD_ID":"W1"}
{"__REALTIME_TIMESTAMP":"1764590400000002","MESSAGE":"workload output","LINE":[104,105,255],"NEXLET_STREAM":"stdout"}
not json
{"__REALTIME_TIMESTAMP":"1764590401000000","MESSAGE":"workload output","LINE":"oops","STREAM":"stderr"}
`)
	lines, err := parse(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 2 {
		t.Fatalf("lines %+v", lines)
	}
	if l := lines[0]; l.Line != "hello" || l.Stream != "stdout" || !l.Time.Equal(time.UnixMicro(1764590400000001)) {
		t.Errorf("first %+v", l)
	}
	if l := lines[1]; l.Line != "oops" || l.Stream != "stderr" {
		t.Errorf("second (older nexd: STREAM) %+v", l)
	}
}

// TestSinceAndTail: with --since, journalctl is not asked for -n (it would count from
// the start of the range): the last lines since then are cut here. A stand-in
// journalctl prints a fixed journal and records its arguments.
func TestSinceAndTail(t *testing.T) {
	dir := t.TempDir()
	base := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	var entries strings.Builder
	for i := range 5 {
		fmt.Fprintf(&entries, `{"__REALTIME_TIMESTAMP":"%d","MESSAGE":"workload output","LINE":"line-%d","NEXLET_STREAM":"stdout"}`+"\n",
			base.Add(time.Duration(i)*time.Second).UnixMicro(), i+1)
	}
	testkit.WriteFile(t, filepath.Join(dir, "journal.json"), entries.String())
	fake := filepath.Join(dir, "journalctl")
	testkit.WriteExecutable(t, fake, "#!/bin/sh\necho \"$@\" > "+filepath.Join(dir, "args")+"\ncat "+filepath.Join(dir, "journal.json")+"\n")
	for _, tc := range []struct {
		name     string
		since    time.Time
		tail     int
		want     string
		wantArgs string // in journalctl's arguments
		notArgs  string
	}{
		{"tail", time.Time{}, 2, "line-4 line-5", "-n 2", "--since"},
		{"since", base.Add(2500 * time.Millisecond), 0, "line-4 line-5", "--since @" + fmt.Sprint(base.Add(2*time.Second).Unix()), " -n "},
		{"since and tail", base.Add(time.Second), 1, "line-5", "--since", " -n "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines, err := workloadOutput(t.Context(), fake, "W1", 998, tc.since, tc.tail)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, l := range lines {
				got = append(got, l.Line)
			}
			if strings.Join(got, " ") != tc.want {
				t.Errorf("lines %v, want %s", got, tc.want)
			}
			args, _ := os.ReadFile(filepath.Join(dir, "args"))
			if !strings.Contains(string(args), tc.wantArgs) || strings.Contains(string(args), tc.notArgs) ||
				!strings.Contains(string(args), "NEX_WORKLOAD_ID=W1") || !strings.Contains(string(args), "_UID=998") {
				t.Errorf("journalctl %s", args)
			}
		})
	}
}
