package daemon

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/daemon/sysd"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestStopExtensionBounded: a stop step stuck past its own bound (here a closer that
// never returns until the test ends it) gets systemd's stop timeout extended
// (EXTEND_TIMEOUT_USEC, over a real notify socket) only up to the stop's bound, where
// the step is named as the one the stop is stuck on (stopOverdue; nexd then exits:
// e2e TestStopPastItsBoundExits). Before, the extension was renewed for as long as the
// stop ran, so TimeoutStopSec never ended it (a nexd seen taking ~6 min to stop).
func TestStopExtensionBounded(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	pc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	out := &testkit.Buffer{}
	log := testLogger(out)
	n := sysd.NewNotifier(log)

	var mu sync.Mutex
	var last time.Time
	count := 0
	var rwg sync.WaitGroup
	rwg.Go(func() {
		buf := make([]byte, 4096)
		for {
			k, err := pc.Read(buf)
			if err != nil {
				return
			}
			if strings.HasPrefix(string(buf[:k]), "EXTEND_TIMEOUT_USEC=") {
				mu.Lock()
				count++
				last = time.Now()
				mu.Unlock()
			}
		}
	})

	var c closers
	stuck := make(chan struct{})
	c.push("node API", func(context.Context) error { <-stuck; return nil })
	unwound := make(chan struct{})
	go func() { c.unwind(context.Background(), log); close(unwound) }()

	const extend, bound = 100 * time.Millisecond, 500 * time.Millisecond
	began := time.Now()
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { extendStop(n, &c, done, extend, bound) })
	var on string
	var over bool
	var overAt time.Duration
	wg.Go(func() { on, over = stopOverdue(&c, done, bound); overAt = time.Since(began) })
	time.Sleep(bound + 10*extend) // the step is still stuck well past the bound
	mu.Lock()
	after, sent := last.Sub(began), count
	mu.Unlock()
	close(done)
	wg.Wait()
	close(stuck)
	<-unwound
	pc.Close()
	rwg.Wait()

	t.Logf("%d extensions, the last %v after the stop began (bound %v)", sent, after.Round(time.Millisecond), bound)
	if sent == 0 {
		t.Fatal("no EXTEND_TIMEOUT_USEC sent")
	}
	if after > bound {
		t.Errorf("stop timeout extended %v after the stop began, past its bound %v", after, bound)
	}
	t.Logf("overdue at %v on %q", overAt.Round(time.Millisecond), on)
	if !over || on != "node API" || overAt < bound {
		t.Errorf("the stop past its bound: overdue %v at %v on %q; want overdue at %v or later on \"node API\"", over, overAt, on, bound)
	}
}

// TestStopBoundBelowTimeoutStopSec: with the default stop_grace the stop's bound is
// below the packaged unit's TimeoutStopSec, so systemd's SIGKILL is the last resort.
func TestStopBoundBelowTimeoutStopSec(t *testing.T) {
	unit, err := os.ReadFile("../contrib/systemd/nexd.service")
	if err != nil {
		t.Fatal(err)
	}
	var timeoutStop time.Duration
	for line := range strings.Lines(string(unit)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "TimeoutStopSec="); ok {
			if timeoutStop, err = time.ParseDuration(v); err != nil {
				t.Fatalf("TimeoutStopSec=%s: %v", v, err)
			}
		}
	}
	if timeoutStop == 0 {
		t.Fatal("no TimeoutStopSec in the unit")
	}
	if b := stopBound(10 * time.Second); b >= timeoutStop {
		t.Errorf("stopBound(10s) = %v, not below the unit's TimeoutStopSec=%v", b, timeoutStop)
	}
}
