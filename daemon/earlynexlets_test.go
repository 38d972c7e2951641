package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestControlServesWhileEarlyNexletsWait: with an external server the native nexlet's
// start (the nexlets' manager, whose first cgroup change can wait out the pre-started
// nexlet's warm-up, README Ready) runs beside nexd's own steps: while it is held in its
// cgroup set-up, the control socket already answers status. On the code before, the
// socket opened only after the manager was built (the status never came). A manager
// that then fails (here a nexlet binary that does not exist) still ends the start with
// its error, before NATS is asked for, and leaves no socket and no goroutine behind.
func TestControlServesWhileEarlyNexletsWait(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	before := goroutineIDs() // the server's own run on
	dir := t.TempDir()
	socket := filepath.Join(dir, "nexd.sock")
	missing := filepath.Join(dir, "no-such-nexlet")
	args := []string{"--state-dir", filepath.Join(dir, "state"), "--control-socket", socket,
		"--nats.servers", srv.ClientURL(), "--agents.uri", missing, "--logger.target", "std"}
	loaded, err := config.Load(config.LoadOptions{Args: args, Env: []string{}, Hostname: "inproc"})
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	out := &testkit.Buffer{}
	d, err := newDaemon(loaded, args, out)
	if err != nil {
		t.Fatal(err)
	}
	held, release := make(chan struct{}), make(chan struct{})
	d.hooks.cgroups = func() *cgroup.Manager {
		close(held)
		<-release
		return cgroup.Disabled("in-process test", d.log)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d.run(ctx) }()
	released := false
	defer func() {
		if !released {
			close(release)
		}
		select {
		case <-done:
		case <-time.After(time.Minute):
			t.Errorf("nexd did not stop")
		}
	}()

	select {
	case <-held:
	case err := <-done:
		t.Fatalf("run ended before the nexlets' cgroups were asked for: %v\n%s", err, out.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("the nexlets' cgroups were never asked for\n%s", out.String())
	}
	c := control.NewClient(socket)
	defer c.Close()
	var st control.Status
	testkit.Eventually(t, "status while the early nexlets' cgroup set-up waits", func() bool {
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer scancel()
		st, err = c.Status(sctx)
		return err == nil
	})
	if st.State != control.StateStarting || st.NodeID == "" || st.NATS.Connected {
		t.Fatalf("status while the nexlets' manager is built: %+v (want starting, not yet connected)", st)
	}

	close(release)
	released = true
	select {
	case err = <-done:
		done <- err // for the deferred wait
	case <-time.After(time.Minute):
		t.Fatalf("run did not end after the nexlets' manager failed\n%s", out.String())
	}
	if err == nil || !strings.Contains(err.Error(), "agents[0]") || !strings.Contains(err.Error(), "no-such-nexlet") {
		t.Fatalf("run: %v, want the missing nexlet binary's error", err)
	}
	if strings.Contains(out.String(), "nats connected") || strings.Contains(out.String(), "connected to NATS") {
		t.Errorf("NATS was connected after the nexlets' manager failed:\n%s", out.String())
	}
	c.Close()
	if _, err := os.Stat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket after the failed start: %v, want it removed", err)
	}
	if len(d.closers.names()) != 0 {
		t.Errorf("closers left: %q", d.closers.names())
	}
	assertNoneOutlive(t, before)
}
