package e2e

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestNexctlEventsFollow runs the real `nexctl events -f --json` against a node
// publishing events and sees a job's start and its stop with the exit code.
func TestNexctlEventsFollow(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{extra: []string{"--events", "nats"}})
	n.waitReady(t)

	cmd := exec.Command(nexctlBin(t), append(append([]string{"--control-socket", n.socket}, n.natsArgs()...),
		"--namespace", "lab", "events", "-f", "--json")...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	errPipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	// events -f says on stderr when its subscription is in place; deploy after that.
	errLines := bufio.NewScanner(errPipe)
	if !errLines.Scan() || !strings.Contains(errLines.Text(), `{"following":"$NEX.FEED.lab.events.*"}`) {
		t.Fatalf("events -f did not report its subscription: %q", errLines.Text())
	}
	stderr := &testkit.Buffer{}
	go func() {
		for errLines.Scan() {
			_, _ = stderr.Write([]byte(errLines.Text() + "\n"))
		}
	}()

	job := n.runWorkload(t, "--namespace", "lab", "--name", "job", "--lifecycle", "job", "--", "/bin/sh", "-c", "exit 3")
	var started, ended bool
	deadline := time.After(60 * time.Second)
	for !(started && ended) {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("events -f ended early; stderr: %s", stderr.String())
			}
			var ev struct {
				Type  string          `json:"type"`
				From  string          `json:"from"`
				Event json.RawMessage `json:"event"`
			}
			if err := json.Unmarshal([]byte(l), &ev); err != nil {
				t.Fatalf("events --json line %q: %v", l, err)
			}
			if ev.From != "lab" {
				t.Errorf("event from %q, want only namespace lab's: %s", ev.From, l)
			}
			switch ev.Type {
			case protocol.EventWorkloadStarted:
				var w protocol.WorkloadStartedEvent
				_ = json.Unmarshal(ev.Event, &w)
				started = started || w.ID == job.ID
			case protocol.EventWorkloadStopped:
				var w protocol.WorkloadStoppedEvent
				_ = json.Unmarshal(ev.Event, &w)
				if w.ID == job.ID {
					if w.Error == nil || w.Error.Code != "3" {
						t.Errorf("stop event without exit code 3: %s", ev.Event)
					}
					ended = true
				}
			}
		case <-deadline:
			t.Fatalf("started %v, stopped %v after 60s; stderr: %s", started, ended, stderr.String())
		}
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	err = cmd.Wait()
	stopped = true
	if err != nil {
		t.Errorf("events -f after Ctrl-C: %v (stderr %s)", err, stderr.String())
	}

	// The plain form names the exit code too.
	out, _, code := n.ctl(t, "events", "--type", "workloadstopped", "--wait", "100ms")
	if code != 0 {
		t.Errorf("events without -f: exit %d: %s", code, out)
	}
}
