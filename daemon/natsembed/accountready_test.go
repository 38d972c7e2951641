package natsembed

import (
	"fmt"
	"log/slog"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestAccountJetStreamReadyBeforeAnyConnection: the zero-config server sets up the nex
// account's JetStream before it accepts a connection. nats-server enables an account's
// JetStream when the account is first looked up, publishes it to the account's clients
// and only then removes the empty streams directory its check made; when the leaf
// connection and nexd's own connection looked the account up at once, nexd's KV create
// ran between the two and failed ("could not create storage directory - mkdir
// …/jetstream/<account>/streams: no such file or directory": the fleet test
// TestFleetLeafWANOutage, twice on a loaded host). Here the leaf remote points at a
// port nothing listens on and no client connects: before, the account was not set up
// at all when the server was ready.
func TestAccountJetStreamReadyBeforeAnyConnection(t *testing.T) {
	remote := fmt.Sprintf("nats-leaf://leaf:s3cret@127.0.0.1:%d", testkit.StablePort(t))
	for _, o := range []Options{
		{Port: -1, StateDir: t.TempDir()},
		{Port: -1, StateDir: t.TempDir(), LeafRemote: remote, JSDomain: "site1"},
	} {
		srv, _, _, err := startZeroConfig(ctxT(t), o, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		n := srv.NATS().JetStreamNumAccounts()
		srv.Shutdown()
		if n != 1 {
			t.Errorf("leaf remote %q: %d accounts have JetStream when the server is ready; want the nex account's", o.LeafRemote, n)
		}
	}
}
