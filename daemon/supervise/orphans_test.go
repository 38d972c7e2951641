package supervise

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procexit"
	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestOrphanEndedBeforeRefreshIsRecorded: a recorded workload process that ends (as an
// orphan, reaped by init) after the listener started but before the watch's refresh
// looked, its exit event still unread, gets its exit recorded when the event is read.
// Before, the refresh saw it dead with no recent exit, and the event then read matched
// nothing: its exit code was lost (a flake of TestAdoptedNexletCrashKeepsExitCodes).
func TestOrphanEndedBeforeRefreshIsRecorded(t *testing.T) {
	l, err := procexit.Listen()
	if err != nil {
		t.Skipf("process events unavailable here (root in the initial namespaces needed): %v", err)
	}
	// An orphan that waits for a file, then exits 5.
	release := t.TempDir() + "/go"
	out, err := exec.Command("/bin/sh", "-c", `(while [ ! -e "$0" ]; do sleep 0.05; done; exit 5) >/dev/null 2>&1 & echo $!`, release).Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	id, err := procid.Of(pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the orphan ended", func() bool { return !id.Alive() })

	exits := t.TempDir()
	w := &orphanWatch{log: slog.New(slog.DiscardHandler), exits: exits, l: l, watch: map[int]uint64{},
		list: func() []procid.ID { return []procid.ID{id} }, mine: func(int) bool { return false }}
	w.refresh() // the exit event is still unread in the socket
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx) }()
	defer func() { cancel(); <-done }()
	testkit.EventuallyWithin(t, 10*time.Second, "the orphan's exit recorded", func() bool {
		e, err := procid.ReadExit(exits, id)
		return err == nil && e.Code == 5
	})
}

// TestOrphanOfDyingNexletIsRecorded: a workload that ends while its nexlet is being
// killed has the nexlet as its parent in the exit event, but the nexlet never reaps it
// (init does). Before, the watch took the nexlet's parenthood to mean that the nexlet
// reported the exit, and the exit code was lost (a flake of
// TestAdoptedNexletCrashKeepsExitCodes: the job ended within the nexlet's SIGKILL).
// Here a parent that never reaps (sleep) plays the nexlet.
func TestOrphanOfDyingNexletIsRecorded(t *testing.T) {
	l, err := procexit.Listen()
	if err != nil {
		t.Skipf("process events unavailable here (root in the initial namespaces needed): %v", err)
	}
	release := t.TempDir() + "/go"
	parent := exec.Command("/bin/sh", "-c", `(while [ ! -e "$0" ]; do sleep 0.05; done; exit 5) >/dev/null 2>&1 & echo $!; exec sleep 600`, release)
	out, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { parent.Process.Kill(); parent.Wait() }()
	line := make([]byte, 32)
	k, err := out.Read(line)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(line[:k])))
	id, err := procid.Of(pid)
	if err != nil {
		t.Fatal(err)
	}
	nexlet := parent.Process.Pid
	exits := t.TempDir()
	w := &orphanWatch{log: slog.New(slog.DiscardHandler), exits: exits, l: l, watch: map[int]uint64{},
		list: func() []procid.ID { return []procid.ID{id} }, mine: func(p int) bool { return p == nexlet }}
	w.refresh()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx) }()
	defer func() { cancel(); <-done }()

	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the workload's exit event read (its parent alive, not reaping)", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		_, watched := w.watch[pid]
		return !watched
	})
	if _, err := procid.ReadExit(exits, id); err == nil {
		t.Fatal("an exit recorded while its nexlet parent lived (the nexlet reports it)")
	}
	parent.Process.Kill()
	parent.Wait()
	w.nexletGone(nexlet)
	testkit.EventuallyWithin(t, 10*time.Second, "the exit recorded once its nexlet died", func() bool {
		e, err := procid.ReadExit(exits, id)
		return err == nil && e.Code == 5
	})
}
