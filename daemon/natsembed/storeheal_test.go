package natsembed

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestStoreFullHealsInPlace: the zero-config server's store (the state directory, here
// a small tmpfs) fills up under a KV bucket sized like the node's; its writes fail with
// ENOSPC, and nats-server keeps refusing them after the space is freed, until its
// JetStream restarts. The server restarts it in place once the store has room: the
// bucket takes writes again and kept what it had. Before, every write failed until
// nexd restarted (TestEmbeddedStoreDiskFullHeals in e2e shows what that cost).
func TestStoreFullHealsInPlace(t *testing.T) {
	// JetStream reserves the bucket's 100 MB from 75 % of the free space.
	dir := testkit.SmallFS(t, "160m")
	c := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: dir})
	js, err := jetstream.New(c.NC)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "nex-full", MaxBytes: 100_000_000, History: 1})
	if err != nil {
		t.Fatal(err)
	}
	put := func(k string) error {
		cx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := kv.Put(cx, k, make([]byte, 1000))
		return err
	}
	if err := put("before"); err != nil {
		t.Fatal(err)
	}
	fill := testkit.FillFS(t, dir)
	failed := false
	for i := 0; i < 20 && !failed; i++ {
		failed = put("full") != nil // the first few may still fit in a written page
	}
	if !failed {
		t.Fatal("writes on a full store did not fail")
	}
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 4*storeCheckEvery, "the bucket takes writes again", func() bool { return put("after") == nil })
	if e, err := kv.Get(ctx, "before"); err != nil || len(e.Value()) != 1000 {
		t.Errorf("the value written before the disk filled up: %v", err)
	}
	if s := c.InProcess().(*Server).storeBroken(); s != "" {
		t.Errorf("store still broken: %s", s)
	}
}

// TestRevocationSavedAfterDiskFull: a user is revoked while the state directory's file
// system is full. The revocation is in force at once (the user is cut off); the nex
// account JWT that holds it is saved once there is room, so that the server of the
// next start refuses the user too. Before, the failed save was the revocation's error,
// and nothing saved it later: after a restart the revoked user connected (1 of 1).
func TestRevocationSavedAfterDiskFull(t *testing.T) {
	state := testkit.SmallFS(t, "16m")
	c := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	trust := c.InProcess().(*Server).Trust()
	var fill string
	userJWT, seed := revokeVictim(t, c, func() { fill = testkit.FillFS(t, state) })
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 4*storeCheckEvery, "the store watch saves the account JWT", func() bool {
		trust.mu.Lock()
		defer trust.mu.Unlock()
		return !trust.unsaved
	})
	c.Close(ctxT(t))

	c2 := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	if nc, err := nats.Connect(c2.ClientURLs()[0], nats.UserJWTAndSeed(userJWT, seed)); err == nil {
		nc.Close()
		t.Error("a user revoked on a full disk connected after the restart")
	}
}

// TestRevocationSavedAtShutdown: the disk has room again but the store watch has not
// ticked yet when nexd stops (the operator frees space and restarts nexd at once).
// Before, the revocation in force was not saved and the next start forgot it.
func TestRevocationSavedAtShutdown(t *testing.T) {
	state := testkit.SmallFS(t, "16m")
	c := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	var fill string
	userJWT, seed := revokeVictim(t, c, func() { fill = testkit.FillFS(t, state) })
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	c.Close(ctxT(t))

	c2 := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	if nc, err := nats.Connect(c2.ClientURLs()[0], nats.UserJWTAndSeed(userJWT, seed)); err == nil {
		nc.Close()
		t.Error("a user revoked on a full disk connected after a restart made once there was room")
	}
}
