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
