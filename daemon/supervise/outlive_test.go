package supervise

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestOutlivingNexletAdopted: a nexlet with Spec.Outlive survives Detach+Stop of its
// supervisor (same process, still running, its output buffered in its FIFO); the next
// supervisor adopts it instead of starting a second one, reads what it wrote meanwhile,
// tells it to register again (SignalReattach), and stops it for good when not detached.
func TestOutlivingNexletAdopted(t *testing.T) {
	// A signal ignored by the test binary (go test under nohup) stays ignored in the
	// shell it starts, and a shell cannot trap a signal ignored at its start: the
	// SIGHUP never reached the trap. nexd catches SIGHUP before it starts nexlets
	// (daemon.run), so its children get the default; while caught here, so do ours.
	signal.Notify(make(chan os.Signal, 1), SignalReattach)
	t.Cleanup(func() { signal.Reset(SignalReattach) })
	dir := t.TempDir()
	hup := filepath.Join(dir, "hup")
	script := `trap 'echo reattached > "$0"; echo reattached-line' HUP; echo started; while :; do sleep 0.1; done`
	spec := Spec{Name: "keep", Path: "/bin/sh", Args: []string{"-c", script, hup}, Outlive: true}
	opts := func(r *recorder) Options {
		return Options{RecordDir: filepath.Join(dir, "records"), FIFODir: filepath.Join(dir, "fifos"),
			Adopt: []string{"keep"}, Grace: 2 * time.Second, Logger: slog.New(recHandler{r: r}),
			Meta: func(string) map[string]string { return map[string]string{"agent_id": "A1"} }}
	}
	ctx := context.Background()
	r1 := &recorder{}
	s1 := New(opts(r1))
	if err := s1.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	var pid int
	testkit.EventuallyWithin(t, 10*time.Second, "the nexlet runs", func() bool {
		pid = s1.Statuses()[0].PID
		return pid != 0
	})
	// Its HUP trap is set once it said "started": a SIGHUP before that (the adoption
	// below comes within milliseconds) ended the shell, and the test waited in vain for
	// "reattached" (a flake under load).
	testkit.EventuallyWithin(t, 10*time.Second, "the nexlet said started (its trap is set)", func() bool {
		return len(r1.find(func(x rec) bool { return strings.TrimSpace(x.msg) == "started" })) > 0
	})
	s1.Detach()
	if err := s1.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	record, ok := ReadRecord(opts(r1).RecordDir, "keep")
	if !ok || record.PID != pid || record.Meta["agent_id"] != "A1" {
		t.Fatalf("record after a detached stop: %+v %v (pid %d)", record, ok, pid)
	}
	id, _ := procid.Of(pid)
	if !id.Alive() {
		t.Fatal("the outliving nexlet did not survive its supervisor")
	}

	r2 := &recorder{}
	s2 := New(opts(r2))
	if err := s2.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if got := s2.Statuses()[0].PID; got != pid {
		t.Fatalf("second supervisor runs pid %d, want the adopted %d", got, pid)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the adopted nexlet got SignalReattach", func() bool {
		b, _ := os.ReadFile(hup)
		return strings.Contains(string(b), "reattached")
	})
	testkit.EventuallyWithin(t, 10*time.Second, "its output read again", func() bool {
		return len(r2.find(func(x rec) bool { return strings.Contains(x.msg, "reattached-line") })) > 0
	})
	if err := s2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the adopted nexlet stopped", func() bool { return !id.Alive() })
	if _, ok := ReadRecord(opts(r2).RecordDir, "keep"); ok {
		t.Fatal("the record of a stopped nexlet is still there")
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}
