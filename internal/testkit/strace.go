package testkit

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Syscalls runs cmd under strace (-f, fds shown with their paths) tracing only calls
// (strace's -e trace= list) and returns the trace's lines; cmd's own failure fails t.
// It is how a test sees what cannot be seen from outside without a crash, such as
// whether a directory was synced after a rename. .ci/run installs strace.
func Syscalls(t testing.TB, cmd *exec.Cmd, calls string) []string {
	t.Helper()
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Fatalf("strace is needed to see %s (.ci/run installs it): %v", calls, err)
	}
	out := filepath.Join(t.TempDir(), "strace")
	cmd.Args = append([]string{strace, "-f", "-y", "-qq", "-e", "signal=none", "-e", "trace=" + calls, "-o", out, cmd.Path}, cmd.Args[1:]...)
	cmd.Path = strace
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v under strace: %v\n%s", cmd.Args[10:], err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// SyncedAfterRename says whether trace (Syscalls with rename and fsync calls) renames a
// file onto path and then syncs path's directory. A call another thread interrupted is
// split by strace into "<unfinished ...>" and "<... name resumed>" lines; it is joined
// and counted where it ended.
func SyncedAfterRename(trace []string, path string) bool {
	sync := regexp.MustCompile(`fsync\(\d+<` + regexp.QuoteMeta(filepath.Dir(path)) + `>\)\s*= 0`)
	started := map[string]string{} // thread -> its unfinished call's start
	renamed := false
	for _, l := range trace {
		// strace pads the thread id to five columns: "4245  fsync(...".
		tid, call, _ := strings.Cut(strings.TrimSpace(l), " ")
		call = strings.TrimSpace(call)
		if start, ok := strings.CutSuffix(call, " <unfinished ...>"); ok {
			started[tid] = start
			continue
		}
		if strings.HasPrefix(call, "<... ") {
			if _, end, ok := strings.Cut(call, " resumed>"); ok {
				call = started[tid] + end
				delete(started, tid)
			}
		}
		switch {
		case strings.Contains(call, "rename") && strings.Contains(call, `"`+path+`"`) && strings.HasSuffix(call, "= 0"):
			renamed = true
		case renamed && sync.MatchString(call):
			return true
		}
	}
	return false
}
