package daemon

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/logstream"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestStateOpenWaitsForClusterToForm: a node that boots with its NATS cluster asks for
// an R3 state bucket while only two of the three servers are up (the meta leader is
// elected, the third peer is not known yet), and nats-server answers "no suitable
// peers for placement" (10005). nexd waits, says why (STATUS and a log line naming a
// forming cluster or too few JetStream servers), and opens the bucket with three
// replicas once the third server joins; before it exited at once (make fleet-test-ci,
// TestFleetNATSServerKilled).
func TestStateOpenWaitsForClusterToForm(t *testing.T) {
	c := testnats.NewCluster(t, 3)
	c.Start(0)
	c.Start(1)
	c.WaitJetStreamPeers(2)
	p := startInProcess(t, "--nats.servers", c.URLs(), "--state", "kv", "--state-replicas", "3", "--startup-timeout", "5m")
	testkit.Eventually(t, "nexd waits for JetStream to place the bucket", func() bool {
		select {
		case err := <-p.done:
			p.done <- err // for the cleanup
			t.Fatalf("nexd exited instead of waiting for the cluster: %v\n%s", err, p.out.String())
		default:
		}
		return strings.Contains(p.out.String(), "may still be forming")
	})
	if st := p.status(t, control.StateStarting); !strings.Contains(st.Detail, "waiting for JetStream") {
		t.Fatalf("status while the cluster forms: %q, want it to say nexd waits for JetStream", st.Detail)
	}
	c.Start(2)
	st := p.status(t, control.StateRunning)
	nc := testnats.Connect(t, c.Servers[2])
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(t.Context(), state.BucketName(st.NodeID))
	if err != nil {
		t.Fatalf("state bucket after the cluster formed: %v", err)
	}
	bs, err := kv.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if got := bs.(*jetstream.KeyValueBucketStatus).StreamInfo().Config.Replicas; got != 3 {
		t.Fatalf("state bucket has %d replicas, want 3", got)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}
}

// Only the reasons a forming cluster gives are waited for; a placement that waiting
// cannot fix (storage, tags) fails start-up at once. The descriptions are
// nats-server's selectPeerError texts.
func TestPlacementPendingReasons(t *testing.T) {
	for desc, want := range map[string]bool{
		"no suitable peers for placement":                                     true,
		"no suitable peers for placement, peer offline":                       true,
		"no suitable peers for placement, jetstream not enabled in cluster":   true,
		"no suitable peers for placement, peer offline, miscellaneous issue":  true,
		"no suitable peers for placement, insufficient storage":               false,
		"no suitable peers for placement, peer offline, insufficient storage": false,
		"no suitable peers for placement, tags not matched ['region:x']":      false,
		"no suitable peers for placement, exclude tag set":                    false,
		"no suitable peers for placement, server tag not unique":              false,
		"preferred server \"n1\" not known":                                   false,
	} {
		err := fmt.Errorf("state: open KV bucket: %w", &jetstream.APIError{Code: 400, ErrorCode: 10005, Description: desc})
		if retry, hint := retryableJS(err); retry != want || (retry && hint != placementHint) {
			t.Errorf("%q: retry %v hint %q, want retry %v", desc, retry, hint, want)
		}
	}
}

// TestLogStreamWaitsForClusterToForm: a node with log_stream on boots while its NATS
// cluster has one of three servers up, so JetStream has no meta leader and cannot
// create NEX_LOGS. The node starts anyway (output flows live), retries in the
// background, and the stream exists once a second server gives the cluster a quorum;
// before, nexd logged one error and never made the stream. The retries end with the
// node's stop (the goroutine is owned and awaited).
func TestLogStreamWaitsForClusterToForm(t *testing.T) {
	c := testnats.NewCluster(t, 3)
	c.Start(0)
	p := startInProcess(t, "--nats.servers", c.URLs(), "--log-stream", "--startup-timeout", "5m")
	p.status(t, control.StateRunning)
	testkit.Eventually(t, "nexd's first try at the log stream failed", func() bool {
		return strings.Contains(p.out.String(), "log_stream")
	})
	c.Start(1)
	nc := testnats.Connect(t, c.Servers[1])
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "NEX_LOGS made once the cluster has a quorum", func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		_, err := js.Stream(ctx, logstream.Stream)
		return err == nil
	})
	testkit.Eventually(t, "nexd says it keeps workload output", func() bool {
		return strings.Contains(p.out.String(), "keeping workload output")
	})
	if err := p.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if !strings.Contains(p.out.String(), "for the log stream, retrying") || strings.Contains(p.out.String(), "stream cannot be created") {
		t.Fatalf("nexd did not retry the log stream, or gave up on it:\n%s", p.out.String())
	}
}
