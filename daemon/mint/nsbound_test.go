package mint

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestWorkloadNamespaceBound measures, on a real operator-mode server with the default
// max_control_line (4 KiB, which also bounds the CONNECT line carrying the JWT), the
// longest namespace whose minted workload user still connects, without and with a
// JetStream domain (each bucket grant is then written twice), and checks that
// protocol.MaxNamespaceLen stays below it, and that the deploy's size check
// (protocol.MaxWorkloadCredentials) refuses every namespace past it. Measured: 145
// without a domain, 80 with "hub", 70 with a 32-character domain.
func TestWorkloadNamespaceBound(t *testing.T) {
	e := startOperator(t)
	for _, dom := range []string{"", "hub", strings.Repeat("d", 32)} {
		m, err := NewSigningKeyMinter(e.sigSeed, e.accPub, Options{Servers: []string{e.s.ClientURL()}, JSDomain: dom})
		if err != nil {
			t.Fatal(err)
		}
		connects := func(n int) (int, error) {
			cd, err := m.MintWorkload(strings.Repeat("n", n), nuid.Next())
			if err != nil {
				t.Fatal(err)
			}
			// As the nexlet SDK connects: the minted name and inbox prefix.
			nc, err := nats.Connect(e.s.ClientURL(), nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
				nats.Name(cd.ConnName), nats.CustomInboxPrefix(cd.InboxPrefix))
			if err == nil {
				err = nc.Flush()
				nc.Close()
			}
			return protocol.WorkloadCredentialsSize(cd), err
		}
		if size, err := connects(protocol.MaxNamespaceLen); err != nil {
			t.Fatalf("domain %q: a workload of a %d-character namespace (JWT and name %d bytes) cannot connect: %v", dom, protocol.MaxNamespaceLen, size, err)
		} else if size > protocol.MaxWorkloadCredentials {
			t.Fatalf("domain %q: a workload of a %d-character namespace (JWT and name %d bytes) would be refused at deploy (protocol.MaxWorkloadCredentials %d)",
				dom, protocol.MaxNamespaceLen, size, protocol.MaxWorkloadCredentials)
		}
		lo, hi := protocol.MaxNamespaceLen, 1024 // lo connects, hi does not
		// The server's reason for closing, not the client's error: that is often only
		// the reset of the closed connection (testnats.RefusedForControlLine).
		if refused, err := testnats.RefusedForControlLine(t, e.s, func() error { _, err := connects(hi); return err }); err == nil || !refused {
			t.Fatalf("domain %q: a %d-character namespace: %v, server closed it for the control line: %v, want it closed so", dom, hi, err, refused)
		}
		for lo+1 < hi {
			if mid := (lo + hi) / 2; func() bool { _, err := connects(mid); return err == nil }() {
				lo = mid
			} else {
				hi = mid
			}
		}
		// The deploy's check (protocol.MaxWorkloadCredentials) refuses the shortest
		// namespace whose workload cannot connect.
		if size, _ := connects(hi); size <= protocol.MaxWorkloadCredentials {
			t.Fatalf("domain %q: a %d-character namespace's workload cannot connect, yet its JWT and name (%d bytes) are within protocol.MaxWorkloadCredentials (%d)",
				dom, hi, size, protocol.MaxWorkloadCredentials)
		}
		size, _ := connects(lo)
		t.Logf("domain %q: the longest namespace whose workload connects has %d characters (JWT and name %d bytes)", dom, lo, size)
	}
}

// TestWorkloadNamespaceFitsAsMinted: the auction's check (WorkloadNamespaceFits, the
// longest namespace found once by minting) answers, for every namespace length up to
// protocol.MaxNamespaceLen and every kind of namespace character, as the deploy's
// check of the credentials MintWorkload makes, with and without a JetStream domain
// long enough that namespaces under the bound do not fit; finding it remembers no user.
func TestWorkloadNamespaceFitsAsMinted(t *testing.T) {
	e := startOperator(t)
	for _, dom := range []string{"", "hub", strings.Repeat("d", 48), strings.Repeat("d", 64), strings.Repeat("d", 200)} {
		m, err := NewSigningKeyMinter(e.sigSeed, e.accPub, Options{Servers: []string{e.s.ClientURL()}, JSDomain: dom})
		if err != nil {
			t.Fatal(err)
		}
		refused := 0
		for n := 1; n <= protocol.MaxNamespaceLen; n++ {
			// One character, and every kind of character (the probe uses one).
			for _, ns := range []string{strings.Repeat("Z", n), strings.Repeat("a9_-Q", n)[:n]} {
				fits := m.WorkloadNamespaceFits(ns)
				m.mu.Lock()
				minted := len(m.workloads)
				m.mu.Unlock()
				if minted != 0 {
					t.Fatalf("domain of %d characters: WorkloadNamespaceFits remembered %d workload users", len(dom), minted)
				}
				cd, err := m.MintWorkload(ns, nuid.Next())
				if err != nil {
					t.Fatal(err)
				}
				ar, err := m.MintArtifactReader(ns, nuid.Next())
				if err != nil {
					t.Fatal(err)
				}
				if size := max(protocol.WorkloadCredentialsSize(cd), protocol.WorkloadCredentialsSize(ar)); fits != (size <= protocol.MaxWorkloadCredentials) {
					t.Fatalf("domain of %d characters, namespace %q: credentials of %d bytes (bound %d), WorkloadNamespaceFits %v",
						len(dom), ns, size, protocol.MaxWorkloadCredentials, fits)
				}
				if !fits {
					refused++
				}
				m.mu.Lock()
				clear(m.workloads)
				m.mu.Unlock()
			}
		}
		t.Logf("domain of %d characters: %d of %d namespace lengths do not fit", len(dom), refused/2, protocol.MaxNamespaceLen)
		if len(dom) > 64 && refused == 0 {
			t.Fatalf("domain of %d characters: every namespace fits; the test checks nothing", len(dom))
		}
	}
}

// BenchmarkWorkloadNamespaceFitsFirst is the first WorkloadNamespaceFits of a minter
// (the auction that makes it waits for it): one mint where every namespace fits, a
// search of about seven where some do not (a 64-character JetStream domain).
func BenchmarkWorkloadNamespaceFitsFirst(b *testing.B) {
	acct, _ := nkeys.CreateAccount()
	seed, _ := acct.Seed()
	pub, _ := acct.PublicKey()
	for _, c := range []struct{ name, dom string }{{"new_only", "-"}, {"all_fit", ""}, {"domain64", strings.Repeat("d", 64)}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				m, err := NewSigningKeyMinter(string(seed), pub, Options{JSDomain: strings.TrimPrefix(c.dom, "-")})
				if err != nil {
					b.Fatal(err)
				}
				if c.dom != "-" {
					m.WorkloadNamespaceFits("ns")
				}
			}
		})
	}
}
