package native

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestArtifactFetchRefusedPromptly: a workload's artifact reader (a real nats-server
// user whose permissions leave out one bucket, as the node's minted readers leave out
// other namespaces' buckets) is asked for an object of that bucket. The server refuses
// the request with a permissions violation and sends no answer: before, the fetch
// waited out its whole bound (2 min in a start; a minute here) and reported a
// deadline; now it ends at once with the server's refusal. The same reader fetches an
// object of its own bucket.
func TestArtifactFetchRefusedPromptly(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) {
		o.Users = []*server.User{
			{Username: "admin", Password: "admin"},
			{Username: "reader", Password: "reader", Permissions: &server.Permissions{
				Publish: &server.SubjectPermission{Allow: []string{"$JS.API.>"},
					Deny: []string{"$JS.API.*.*.OBJ_theirs", "$JS.API.*.*.OBJ_theirs.>", "$JS.API.DIRECT.GET.OBJ_theirs.>"}},
			}},
		}
	}})
	admin := testnats.Connect(t, srv, nats.UserInfo("admin", "admin"))
	js, err := jetstream.New(admin, jetstream.WithDefaultTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"mine", "theirs"} {
		obs, err := js.CreateObjectStore(t.Context(), jetstream.ObjectStoreConfig{Bucket: b})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := obs.PutBytes(t.Context(), "app_v1", []byte("#!/bin/sh\necho "+b+"\n")); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	store, err := newArtifactStore(filepath.Join(dir, "store"), filepath.Join(dir, "workloads"))
	if err != nil {
		t.Fatal(err)
	}
	reader := protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}, NatsUserName: "reader", NatsUserPassword: "reader"}
	fetch := func(bucket string) (string, error) {
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		wdir := filepath.Join(dir, "workloads", bucket)
		if err := os.MkdirAll(wdir, 0o700); err != nil {
			t.Fatal(err)
		}
		path, _, err := store.fetchArtifact(ctx, reader, "tenant", artifact{scheme: "nats", bucket: bucket, object: "app_v1"}, wdir, 0, func(protocol.Progress) {})
		return path, err
	}

	start := time.Now()
	_, err = fetch("theirs")
	took := time.Since(start)
	t.Logf("the refused fetch: %v after %v", err, took.Round(time.Millisecond))
	if err == nil || !errors.Is(err, nats.ErrPermissionViolation) || errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), `Permissions Violation for Publish to "$JS.API.STREAM.INFO.OBJ_theirs"`) {
		t.Fatalf("fetch of a bucket the reader may not read: %v, want the server's permissions violation", err)
	}
	if path, err := fetch("mine"); err != nil || path == "" {
		t.Fatalf("fetch of the reader's own bucket: %q, %v", path, err)
	}
}
