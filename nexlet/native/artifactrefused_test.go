package native

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
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

// TestArtifactFetchSparesUnneededRefusal: the workload's own credentials (the fetch's
// fallback when the node minted no fetch user) on a real operator-mode server, a user
// who may read the bucket but not delete consumers. The client library deletes the
// ordered consumer that carried the chunks once the last one arrived; the server
// refuses that, and the refusal reaches the connection while the fetch reads its last
// bytes (held here by a progress report on the last chunk, as a slow report or a
// loaded machine would). The fetch has all it needs then: it succeeds. Before, any
// violation on the connection cancelled it, and it failed with the consumer delete's
// refusal. A refusal of what the fetch needs (the bucket's stream info) still fails at
// once.
func TestArtifactFetchSparesUnneededRefusal(t *testing.T) {
	op := testnats.StartOperator(t, nil)
	admin := op.Connect(t, "admin")
	js, err := jetstream.New(admin, jetstream.WithDefaultTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	const size = 300 << 10 // three chunks
	body := append([]byte("#!/bin/sh\nexit 0\n#"), bytes.Repeat([]byte("x"), size)...)
	for _, b := range []string{"mine", "theirs"} {
		obs, err := js.CreateObjectStore(t.Context(), jetstream.ObjectStoreConfig{Bucket: b})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := obs.PutBytes(t.Context(), "app_v1", body); err != nil {
			t.Fatal(err)
		}
	}
	var p jwt.Permissions
	p.Pub.Allow.Add("$JS.API.>", "$JS.FC.>")
	p.Pub.Deny.Add("$JS.API.CONSUMER.DELETE.>", "$JS.API.STREAM.INFO.OBJ_theirs")
	p.Sub.Allow.Add("_INBOX.>")
	tok, seed := op.UserWith(t, "workload", nil, p)
	creds := protocol.NatsConnectionData{NatsServers: []string{op.Server.ClientURL()}, NatsUserJWT: tok, NatsUserSeed: seed}

	dir := t.TempDir()
	fetch := func(bucket string, i int) error {
		store, err := newArtifactStore(filepath.Join(dir, "store", strconv.Itoa(i)), filepath.Join(dir, "workloads"))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		wdir := filepath.Join(dir, "workloads", bucket+strconv.Itoa(i))
		if err := os.MkdirAll(wdir, 0o700); err != nil {
			t.Fatal(err)
		}
		report := func(pr protocol.Progress) {
			if pr.Total > 0 && pr.Done == pr.Total {
				time.Sleep(100 * time.Millisecond) // the consumer delete's refusal arrives meanwhile
			}
		}
		_, _, err = store.fetchArtifact(ctx, creds, "tenant", artifact{scheme: "nats", bucket: bucket, object: "app_v1"}, wdir, 0, report)
		return err
	}
	const runs = 5
	failed := 0
	for i := range runs {
		if err := fetch("mine", i); err != nil {
			failed++
			t.Logf("fetch %d: %v", i, err)
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d fetches a refused consumer delete failed, want 0", failed, runs)
	}
	start := time.Now()
	err = fetch("theirs", runs)
	t.Logf("the refused fetch: %v after %v", err, time.Since(start).Round(time.Millisecond))
	if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), `"$JS.API.STREAM.INFO.OBJ_theirs"`) {
		t.Fatalf("fetch of a bucket whose stream info is refused: %v, want the server's permissions violation", err)
	}
}

// TestFetchNeeds: which refusals, as the server words them, end a fetch.
func TestFetchNeeds(t *testing.T) {
	for subject, want := range map[string]bool{
		`Publish to "$JS.API.STREAM.INFO.OBJ_b"`:                true,
		`Publish to "$JS.hub.API.STREAM.INFO.OBJ_b"`:            true,
		`Publish to "$JS.API.DIRECT.GET.OBJ_b.$O.b.M.YXBw"`:     true,
		`Publish to "$JS.API.STREAM.MSG.GET.OBJ_b"`:             true,
		`Publish to "$JS.API.CONSUMER.CREATE.OBJ_b.x.$O.b.C.n"`: true,
		`Publish to "$JS.FC.OBJ_b.x.y"`:                         true,
		`Subscription to "_INBOX_w.>"`:                          true,
		`Subscription to "_INBOX.>" using queue "q"`:            true,
		`Publish to "$JS.API.CONSUMER.DELETE.OBJ_b.x"`:          false,
		`Publish to "$JS.hub.API.CONSUMER.DELETE.OBJ_b.x"`:      false,
		`Publish to "$JS.API.STREAM.PURGE.OBJ_b"`:               false,
		`Publish to "elsewhere"`:                                false,
	} {
		err := fmt.Errorf("%w: Permissions Violation for %s", nats.ErrPermissionViolation, subject)
		if got := fetchNeeds(err); got != want {
			t.Errorf("fetchNeeds(%s) = %v, want %v", subject, got, want)
		}
	}
	if !fetchNeeds(nats.ErrPermissionViolation) {
		t.Error("a violation without a subject: not needed, want needed")
	}
}
