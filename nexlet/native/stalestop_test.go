package native

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// envStaleLeaseNexlet makes the test binary the first nexlet of
// TestStaleLeaseRemovalStopsWithThePool: its value is staleLeaseNexlet as JSON.
const envStaleLeaseNexlet = "NEXD_TEST_STALE_LEASE_NEXLET"

type staleLeaseNexlet struct {
	Leases, Owner string
	UID           uint32
	Aside         asideRoots // the test's (the next nexlet's): where it moves trees aside
}

// TestStaleLeaseNexletProcess is that nexlet, in a process of its own: what a stop cut
// short stays in a directory named by its nexlet's pid and start time, and only a
// later nexlet, once this one is gone, removes it (sweepAside). It takes the uid of a
// stale lease and says "LEASED <uid>"; at a line on its stdin (or its end) it stops its
// pool (stopPool) and says "STOPPING" once the stop is under way and "STOPPED" once
// stopPool returned.
func TestStaleLeaseNexletProcess(t *testing.T) {
	v := os.Getenv(envStaleLeaseNexlet)
	if v == "" {
		t.Skip("the first nexlet's process of TestStaleLeaseRemovalStopsWithThePool")
	}
	var c staleLeaseNexlet
	if err := json.Unmarshal([]byte(v), &c); err != nil {
		t.Fatal(err)
	}
	us, err := newUsers(UserPolicy{LeaseDir: c.Leases, UIDMin: c.UID, UIDMax: c.UID}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	us.asideRoots = c.Aside
	us.log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	ids, err := us.leaseFreshN(c.Owner, 1)
	if err != nil || len(ids) != 1 {
		t.Fatalf("leased %v: %v", ids, err)
	}
	fmt.Printf("LEASED %d\n", ids[0].uid)
	in := bufio.NewReader(os.Stdin)
	_, _ = in.ReadString('\n')
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		us.stopPool()
	}()
	<-us.aside.stop
	fmt.Println("STOPPING")
	<-stopped
	fmt.Println("STOPPED")
	// Gone only at the end of its stdin: until then no nexlet's start takes what it
	// left aside as a gone nexlet's.
	_, _ = io.Copy(io.Discard, in)
}

// TestStaleLeaseRemovalStopsWithThePool: the tree a stale lease's reuse moved aside is
// removed by the nexlet's own goroutine, off the deploy's path (handAside), and the
// nexlet's stop (stopPool) ends that removal between two entries instead of waiting for
// a tree of any size; the rest stays aside, root's and 0700, and the next nexlet's start
// removes it. The first nexlet runs in a process of its own (TestStaleLeaseNexletProcess),
// the removal's open of the tree is held (fanotify) while the test looks: the lease has
// answered, the uid's new holder reads the old holder's secret neither where it was nor
// where it went, and the nexlet is told to stop; the open goes on once the stop is under
// way. Then every entry of the tree must still be aside when the stop returned, and a
// later nexlet's start (this process's, its pool begun) removes them. Before, the lease
// call itself removed the tree: it was still in the held open (no answer in 30 s).
func TestStaleLeaseRemovalStopsWithThePool(t *testing.T) {
	needRoot(t)
	next, uid := staleLeaseUsers(t)
	tree, secret := leftoverTreeOf(t, uid, 2000)
	owner := t.TempDir()
	conf, _ := json.Marshal(staleLeaseNexlet{Leases: next.pol.LeaseDir, Owner: owner, UID: uid, Aside: next.asideRoots})
	cmd := exec.Command(os.Args[0], "-test.run=^TestStaleLeaseNexletProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), envStaleLeaseNexlet+"="+string(conf))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	nextLine := func(what string) string {
		select {
		case l, ok := <-lines:
			if !ok {
				return "(ended)"
			}
			return l
		case <-time.After(waitLong):
			return "(nothing in " + waitLong.String() + " while waiting for " + what + ")"
		}
	}
	var aside string
	looked := make(chan struct{})
	h := holdOpens(t, tree, func(path string) {
		defer close(looked)
		aside = filepath.Dir(path)
		if l := nextLine("the lease"); l != "LEASED "+strconv.Itoa(int(uid)) {
			t.Errorf("the first nexlet said %q while the removal of the stale lease's tree was held, want LEASED %d: the deploy waits for the removal", l, uid)
			return
		}
		if got := readAs(t, uid, filepath.Join(tree, "secret"), filepath.Join(path, "secret")); len(got) > 0 {
			t.Errorf("the uid's new holder read what its last holder left: %q", got)
		}
		_, _ = io.WriteString(stdin, "stop\n")
		if l := nextLine("the stop"); l != "STOPPING" {
			t.Errorf("the first nexlet said %q, want STOPPING", l)
		}
	})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if l := sc.Text(); strings.HasPrefix(l, "LEASED") || strings.HasPrefix(l, "STOP") {
				lines <- l
			}
		}
	}()
	select {
	case <-looked:
	case <-time.After(waitLong):
	}
	// The stop, unless the test sent it while it looked (a second line is ignored).
	_, _ = io.WriteString(stdin, "stop\n")
	stoppedLine := ""
	for stoppedLine != "STOPPED" && !strings.HasPrefix(stoppedLine, "(") {
		stoppedLine = nextLine("the stop's return")
	}
	h.stop()
	entries := func() int { return countEntries(aside) }
	// Counted while the first nexlet still runs (it waits for the end of its stdin):
	// a nexlet's start takes a gone nexlet's directory (in the test's own aside roots,
	// only this test's nexlets look).
	// The directory itself, the tree, "many" and its files, "secret".
	left, all := 0, 1+1+1+2000+1
	var rest []byte
	var restErr error
	if aside != "" {
		left = entries()
		rest, restErr = os.ReadFile(filepath.Join(aside, filepath.Base(tree), "secret"))
	}
	_ = stdin.Close()
	if stoppedLine != "STOPPED" {
		_ = cmd.Process.Kill()
	}
	werr := cmd.Wait()
	if werr != nil || stoppedLine != "STOPPED" {
		t.Fatalf("the first nexlet: %q, %v:\n%s", stoppedLine, werr, stderr.String())
	}
	if aside == "" {
		t.Fatal("the tree was never opened for its removal")
	}
	t.Logf("first nexlet (pid %d) stopped with %d of %d entries aside left; its log:\n%s", cmd.Process.Pid, left, all, stderr.String())
	if !strings.HasPrefix(filepath.Base(aside), asideName+strconv.Itoa(cmd.Process.Pid)+"-") {
		t.Errorf("moved aside into %s, not a directory named by the first nexlet (pid %d)", aside, cmd.Process.Pid)
	}
	if left != all {
		t.Errorf("%d of the %d entries aside left when the nexlet's stop returned: the stop waited for the removal", left, all)
	}
	if restErr != nil || string(rest) != secret {
		t.Errorf("the rest aside: %q %v", rest, restErr)
	}

	// The next nexlet's start goes on with it.
	begun := make(chan struct{})
	close(begun)
	next.startPool(1, "", false, begun, slog.New(slog.DiscardHandler))
	gone := testkit.WaitFor(waitLong, func() bool {
		_, err := os.Lstat(aside)
		return os.IsNotExist(err)
	})
	next.stopPool()
	if !gone {
		t.Fatalf("the next start did not remove the rest aside: %d entries left in %s", entries(), aside)
	}
}
