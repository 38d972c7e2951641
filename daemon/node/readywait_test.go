package node

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/randid"
)

// TestAttackNameClaimsReadyWait: the daemon holds READY until its local nexlets, by the
// agent ids it minted for them, have registered (WaitForAgents) and sent their first
// heartbeat (WaitServing), and STATUS names those that have not. The waits counted a
// registration whose registered name was the awaited id as that nexlet: a rogue
// nexlet registering, with its own credentials and key, under the local nexlet's agent
// id as its name, and heartbeating, ended both waits before the local nexlet
// registered (READY early, the nexlet left out of STATUS's "not registered"). The
// rogue is a remote nexlet, listed in remote_nexlets under that string (remote
// registration on), or another local nexlet, whose registered name is its own to
// choose; the agent id is no secret (node info lists it, and an adopted nexlet keeps
// it across nexd's restarts). Before: both waits returned none with only the rogue
// registered. Now only the registration under the id itself, by the nexlet nexd
// announced under it (signed with its start's key), counts.
func TestAttackNameClaimsReadyWait(t *testing.T) {
	for _, attacker := range []string{"remote", "local"} {
		t.Run(attacker, func(t *testing.T) {
			localID := randid.New() // as the daemon mints it
			key, _ := nkeys.CreateUser()
			pub, _ := key.PublicKey()
			rf := newRogueFixture(t, func(o *Options) {
				if attacker == "remote" {
					o.AllowRemoteRegistration = true
					o.RemoteNexlets = []RemoteNexlet{{Name: localID, Type: "native", PublicKey: pub}}
				}
			})
			n := rf.nodes[0]
			local := rf.expected(localID, "native-nexlet", "native")
			signedStart(n, true)(local)

			var rogue *fakeAgent
			switch attacker {
			case "remote":
				rc, err := rf.m.MintRegister("remote0", n.ID())
				if err != nil {
					t.Fatal(err)
				}
				rogue = newFakeAgentOn(t, rf.dial(rc), n.ID(), "remote0", localID, "native")
				rogue.reconnect, rogue.key = rf.dial, key
			case "local":
				rogue = rf.expected("rogue0", "rogue", "native")
				signedStart(n, true)(rogue)
				rogue.req.Name = localID
			}
			rogue.mustRegister() // registers, serves and heartbeats
			waitHealthy(t, n, rogue.id)

			short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			if missing := n.WaitForAgents(short, []string{localID}); !slices.Equal(missing, []string{localID}) {
				t.Errorf("WaitForAgents with only the rogue (name %q) registered = %v, want [%s]: READY would come before the local nexlet registered", localID, missing, localID)
			}
			if silent := n.WaitServing(short, []string{localID}); !slices.Equal(silent, []string{localID}) {
				t.Errorf("WaitServing with only the rogue registered = %v, want [%s]", silent, localID)
			}

			// The local nexlet itself ends both waits.
			ctx, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel2()
			served := make(chan []string, 1)
			go func() { served <- n.WaitServing(ctx, []string{localID}) }()
			local.mustRegister()
			if silent := <-served; len(silent) != 0 {
				t.Fatalf("WaitServing once the local nexlet registered and heartbeat = %v, want none", silent)
			}
			if missing := n.WaitForAgents(ctx, []string{localID}); len(missing) != 0 {
				t.Fatalf("WaitForAgents once the local nexlet registered = %v", missing)
			}
			var ids []string
			for _, ai := range n.Agents() {
				ids = append(ids, ai.ID)
			}
			slices.Sort(ids)
			if want := []string{localID, rogue.id}; !slices.Equal(ids, slices.Sorted(slices.Values(want))) {
				t.Errorf("registered %v, want %v", ids, want)
			}
		})
	}
}
