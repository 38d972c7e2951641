package daemon

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testnats"
)

// The start-up race (a directory removed under the create) is retried; a store that
// cannot be written (permissions, a read-only file system) is not. nats-server sends
// 10077 with code 503 (JSStreamStoreFailedF in its errors.json), the code every other
// 503 is retried for: before, a permission error was retried without end.
func TestStoreDirRaceRetryable(t *testing.T) {
	const mkdir = "could not create storage directory - mkdir /s/jetstream/A/streams: "
	for _, c := range []struct {
		why   string
		retry bool
	}{
		{"no such file or directory", true},
		{"permission denied", false},
		{"read-only file system", false},
	} {
		err := &jetstream.APIError{Code: 503, ErrorCode: jsStreamStoreFailed, Description: mkdir + c.why}
		if retry, _ := retryableJS(fmt.Errorf("state: open KV bucket: %w", err)); retry != c.retry {
			t.Errorf("10077 %q: retried %v, want %v", c.why, retry, c.retry)
		}
	}
}

// TestUnwritableStoreFailsStart: a NATS server whose JetStream store is on a read-only
// or a full file system cannot make the state bucket (10049); nexd exits with
// nats-server's error instead of waiting for a store that will not heal by itself
// (systemd's Restart= retries).
func TestUnwritableStoreFailsStart(t *testing.T) {
	for _, fs := range []string{"read-only", "full"} {
		t.Run(fs, func(t *testing.T) {
			dir := t.TempDir()
			if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", dir).CombinedOutput(); err != nil {
				t.Skipf("cannot mount a tmpfs (needs root): %v: %s", err, out)
			}
			t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
			// JetStream sizes its store from the free space unless told: an 8 MiB file
			// system would refuse the bucket for size (10047) before it writes anything.
			s := testnats.Start(t, testnats.Options{Configure: func(o *natsserver.Options) { o.StoreDir, o.JetStreamMaxStore = dir, 1<<30 }})
			if fs == "read-only" {
				if out, err := exec.Command("mount", "-o", "remount,ro", dir).CombinedOutput(); err != nil {
					t.Fatalf("remount read-only: %v: %s", err, out)
				}
			} else {
				fill, err := os.Create(filepath.Join(dir, "fill"))
				if err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 1<<20)
				for err == nil {
					_, err = fill.Write(buf)
				}
				fill.Close()
			}
			p := startInProcess(t, "--nats.servers", s.ClientURL(), "--state", "kv", "--startup-timeout", "5m")
			select {
			case err := <-p.done:
				p.done <- err // for the cleanup
				if err == nil || !strings.Contains(err.Error(), "error creating store for stream") {
					t.Fatalf("nexd ended with %v, want nats-server's store error", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("nexd still waits for a store on a %s file system\n%s", fs, p.out.String())
			}
		})
	}
}
