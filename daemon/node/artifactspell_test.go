package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/protocol"
)

// TestAttackArtifactReaderBySpelling: the node mints a start's artifact reader when
// its run request names a nats:// URI, and grants it its namespace's bucket whatever
// the URI names. Tenant-a names tenant-b's bucket in every spelling its nexlet reads
// as nats:// (as written, nats:\/\/ and \u006eats://, which JSON decodes alike): the
// reader its nexlet gets never reads tenant-b's object, and reads tenant-a's. Before,
// the escaped spellings got no reader at all (the node looked for the text nats://),
// so such a fetch of tenant-a's own artifact was refused.
func TestAttackArtifactReaderBySpelling(t *testing.T) {
	rf := newRogueFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, ns := range []string{"tenant-a", "tenant-b"} {
		rf.putObject(ctx, ns, "app", []byte(ns+"'s binary"))
	}
	a := rf.minted("native1", "native", "native", nil)
	starts, err := a.nc.SubscribeSync(protocol.AgentPrefix(rf.nodes[0].ID()) + ".native1.STARTWORKLOAD.*")
	if err != nil || a.nc.Flush() != nil {
		t.Fatal(err)
	}
	// read says what the reader the nexlet got reads of bucket's object "app" within
	// wait. A denied read is a request nothing answers: it ends only at the bound.
	read := func(cd protocol.NatsConnectionData, bucket string, wait time.Duration) string {
		t.Helper()
		nc := rf.dial(cd)
		defer nc.Close()
		rjs, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		obs, err := rjs.ObjectStore(rctx, bucket)
		if err != nil {
			return ""
		}
		b, err := obs.GetBytes(rctx, "app")
		if err != nil {
			return ""
		}
		return string(b)
	}
	for _, uri := range []string{`nats://%s/app`, `nats:\/\/%s\/app`, `\u006eats://%s/app`, `\u006e\u0061ts:\/\/%s/app`} {
		for _, target := range []string{"tenant-b", "tenant-a"} {
			run := `{"cmd":"` + fmt.Sprintf(uri, target) + `"}`
			bids := rf.auction("tenant-a", protocol.AuctionRequest{AgentType: "native"}, 1)
			if len(bids) != 1 {
				t.Fatalf("bids %v", bids)
			}
			var started protocol.StartWorkloadResponse
			if m := request(t, rf.client, protocol.DeploySubject("tenant-a", bids[0].BidderID), startReq("tenant-a", "w", run)); protocol.Decode(m.Data, &started) != nil || started.ID == "" {
				t.Fatalf("deploy %s: %q", run, m.Data)
			}
			m, err := starts.NextMsg(30 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			var req protocol.AgentStartWorkloadRequest
			if err := protocol.Decode(m.Data, &req); err != nil {
				t.Fatal(err)
			}
			if req.ArtifactCreds == nil {
				t.Errorf("run request %s: no artifact reader for its nexlet", run)
				continue
			}
			// Its own bucket's read has the time a loaded machine needs; the other's
			// is refused (the server's permissions violation), waited for 2 s.
			wait := 2 * time.Second
			if target == "tenant-a" {
				wait = 30 * time.Second
			}
			got := read(*req.ArtifactCreds, target, wait)
			if target == "tenant-b" && got != "" {
				t.Errorf("run request %s of tenant-a: its reader read %q", run, got)
			}
			if target == "tenant-a" && got != "tenant-a's binary" {
				t.Errorf("run request %s of tenant-a: its reader read %q of its own bucket", run, got)
			}
		}
	}
}
