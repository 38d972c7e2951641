package e2e

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// signingClient is the workload of TestSigningKeyEndToEnd: it connects with the
// credentials nexd minted (nats.UserCredentials re-reads the file on every reconnect,
// so renewed credentials take over after the first JWT expires), tries to subscribe
// to nex's own service subjects, and publishes a tick every 200ms with what it saw.
const signingClient = `package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

func main() {
	var mu sync.Mutex
	var errs []string
	var lastDisconnect string
	nc, err := nats.Connect(os.Getenv("NEX_WORKLOAD_NATS_SERVERS"),
		nats.UserCredentials(os.Getenv("NEX_WORKLOAD_NATS_CREDS_FILE")),
		nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			mu.Lock()
			errs = append(errs, err.Error())
			mu.Unlock()
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			mu.Lock()
			lastDisconnect = fmt.Sprint(err)
			mu.Unlock()
			fmt.Println("disconnected:", err)
		}),
		nats.ReconnectHandler(func(*nats.Conn) { fmt.Println("reconnected") }))
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	fmt.Println("connected")
	if _, err := nc.Subscribe("$NEX.SVC.>", func(*nats.Msg) {}); err != nil {
		mu.Lock()
		errs = append(errs, "subscribe: "+err.Error())
		mu.Unlock()
	}
	ns := os.Getenv("NEX_NAMESPACE")
	start := time.Now()
	for i := 0; ; i++ {
		mu.Lock()
		d, ld := append([]string(nil), errs...), lastDisconnect
		mu.Unlock()
		b, _ := json.Marshal(map[string]any{"n": i, "reconnects": nc.Stats().Reconnects,
			"elapsed_ms": time.Since(start).Milliseconds(), "last_disconnect": ld, "errors": d})
		_ = nc.Publish(ns+".alive", b)
		if len(d) > 0 {
			r, _ := json.Marshal(map[string]any{"errors": d})
			_ = nc.Publish(ns+".report", r)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
`

// operatorNATS runs a nats-server in operator (JWT) mode with one account A that has
// a signing key, and a system account. It returns the server, A's public key, the
// signing key's seed and a creds file for a user of A without limits (the node user).
func operatorNATS(t *testing.T) (srv *server.Server, acct, signingSeed, nodeCreds string) {
	t.Helper()
	op := testnats.StartOperator(t, nil)
	return op.Server, op.Account, op.SigningSeed, op.CredsFile(t, "nexd-node")
}

// signingFlags are nexd's flags for operatorNATS's node user (creds) and its signing
// key (seed) of account acct, then more. The test's throwaway key goes on the command
// line (--insecure-argv); TestAttackLocalUserReadsNodeSeedArgv is why a node's must not.
func signingFlags(creds, seed, acct string, more ...string) []string {
	return append([]string{"--insecure-argv", "--nats.creds-file", creds, "--issuer-signing-key", seed,
		"--issuer-signing-key-root-account", acct}, more...)
}

// TestSigningKeyEndToEnd runs the real nexd against an operator-mode NATS with
// issuer_signing_key: a workload gets its own minted user, scoped to its namespace
// (nex's $NEX.SVC subjects are denied), and keeps working past its short
// workload_creds_ttl because its nexlet renews the credentials through nexd.
func TestSigningKeyEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const ttl = 6 * time.Second

	dir := t.TempDir()
	testkit.WriteFile(t, filepath.Join(dir, "main.go"), signingClient)
	client := filepath.Join(testkit.PublicDir(t), "signingclient") // workloads run as dynamic uids
	build := exec.Command("go", "build", "-o", client, filepath.Join(dir, "main.go"))
	build.Dir = ".." // the module's nats.go
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the workload client: %v\n%s", err, out)
	}

	srv, acct, sigSeed, creds := operatorNATS(t)
	url := srv.ClientURL()
	n := startNode(t, nodeOpts{external: url, extra: signingFlags(creds, sigSeed, acct, "--workload-creds-ttl", ttl.String())})
	n.waitReady(t)

	nc, err := nats.Connect(url, nats.UserCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	type tick struct {
		N          int
		Reconnects uint64
		ElapsedMS  int64    `json:"elapsed_ms"`
		Disconnect string   `json:"last_disconnect"`
		Errors     []string // every asynchronous error the client was told about
		at         time.Time
	}
	ticks := make(chan tick, 4096)
	if _, err := nc.Subscribe("tenant.alive", func(m *nats.Msg) {
		var tk tick
		if json.Unmarshal(m.Data, &tk) == nil {
			tk.at = time.Now()
			select {
			case ticks <- tk:
			default:
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	reports, err := nc.SubscribeSync("tenant.report")
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	out, errOut, code := run(t, nil, nexctlBin(t), "--control-socket", n.socket, "--nats.servers", url,
		"--nats.creds-file", creds, "--namespace", "tenant", "--json",
		"workload", "run", "--name", "w", "--", client)
	if code != 0 {
		t.Fatalf("nexctl workload run: exit %d\nstdout: %s\nstderr: %s\nnexd:\n%s", code, out, errOut, n.out.String())
	}
	var r runResult
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.ID == "" {
		t.Fatalf("workload run --json: %v: %q", err, out)
	}

	// 1. The workload connects with its minted user and publishes in its namespace.
	var first tick
	select {
	case first = <-ticks:
	case <-time.After(60 * time.Second):
		t.Fatalf("no tick on tenant.alive from workload %s\nnexd:\n%s", r.ID, n.out.String())
	}

	// 2. Its user may not subscribe to nex's service subjects.
	deniedSvc := func(errs []string) bool {
		return slices.ContainsFunc(errs, func(e string) bool {
			return strings.Contains(strings.ToLower(e), "permissions violation") && strings.Contains(e, "$NEX.SVC.>")
		})
	}
	var rep struct{ Errors []string }
	for !deniedSvc(rep.Errors) {
		msg, err := reports.NextMsg(30 * time.Second)
		if err != nil {
			t.Fatalf("subscribing to $NEX.SVC.> was not denied (no such report: %v); last report %q", err, rep.Errors)
		}
		if err := json.Unmarshal(msg.Data, &rep); err != nil {
			t.Fatalf("report %q: %v", msg.Data, err)
		}
	}

	// 3. It still publishes well past the 6s lifetime of its first JWT, after the server
	// cut the expired user off and the client reconnected with the renewed file.
	deadline := time.After(90 * time.Second)
wait:
	for {
		select {
		case tk := <-ticks:
			if tk.at.Sub(first.at) >= 10*time.Second && tk.ElapsedMS >= 10_000 && tk.Reconnects >= 1 {
				t.Logf("tick %d at %dms after %d reconnect(s), last disconnect: %s", tk.N, tk.ElapsedMS, tk.Reconnects, tk.Disconnect)
				if !slices.ContainsFunc(tk.Errors, func(e string) bool { return strings.Contains(strings.ToLower(e), "expired") }) {
					t.Errorf("the server never told the workload its user expired; its errors: %q", tk.Errors)
				}
				break wait
			}
		case <-deadline:
			t.Fatalf("no tick with a reconnect >= 10s after the first\nnexd:\n%s", n.out.String())
		}
	}
	log := n.out.String()
	if strings.Contains(log, "cannot mint") {
		t.Fatalf("nexd could not mint credentials:\n%s", log)
	}
	// The nexlet (its log is part of nexd's) renewed through nexd, not by luck.
	renewed := false
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "workload credentials renewed") && strings.Contains(l, r.ID) {
			renewed = true
		}
	}
	if !renewed {
		t.Fatalf("no renewal of workload %s in the nexd log:\n%s", r.ID, log)
	}
}
