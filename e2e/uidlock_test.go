package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// systemdTakes does systemd's check on a dynamic uid's lock file (src/core/dynamic-user.c,
// pick_uid: open O_CREAT, flock LOCK_EX|LOCK_NB, start over if the file was unlinked)
// from this process, another than nexd's and its nexlet's: true when systemd would get
// the lock and so give the uid to a DynamicUser= service. The lock is let go again.
func systemdTakes(t *testing.T, path string) bool {
	t.Helper()
	for {
		fd, err := unix.Open(path, unix.O_CREAT|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOCTTY, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if errors.Is(err, unix.EWOULDBLOCK) {
			unix.Close(fd)
			return false
		}
		if err != nil {
			unix.Close(fd)
			t.Fatal(err)
		}
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		if st.Nlink > 0 {
			return true
		}
	}
}

// TestNexletKillKeepsSystemdUIDLocks: the native nexlet holds systemd's lock on each
// running workload's dynamic uid (/run/systemd/dynamic-uid/<uid>), and nexd a copy of
// it (the same open file, passed over its uid lock socket). The nexlet is killed (-9)
// with 6 services running while nexd is held stopped (SIGSTOP), so the next nexlet
// cannot come yet; in that window this process does systemd's check on every running
// workload's uid: 0 of 6 taken (before, with no copy kept, 6 of 6: a DynamicUser=
// service starting then could be given any of them). nexd resumed, the next nexlet
// takes the copies over as it adopts the services: still 0 of 6 taken, and no adoption
// says the lock is another's. Once the services are stopped, their lock files are
// unlinked (0 left), as systemd's own release leaves none. "adopted": the same with a
// nexlet that a restarted nexd adopted (live_restore): the new nexd, whose process
// never had the copies, gets them again when the nexlet connects to it. "reexec": the
// same after nexd re-executed itself (its copies, close-on-exec, went with the old
// image): the nexlet connects again and sends them.
func TestNexletKillKeepsSystemdUIDLocks(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("dynamic uids need root")
	}
	for _, how := range []string{"spawned", "adopted", "reexec"} {
		t.Run(how, func(t *testing.T) { nexletKillKeepsSystemdUIDLocks(t, how) })
	}
}

func nexletKillKeepsSystemdUIDLocks(t *testing.T, how string) {
	const services = 6
	sd := filepath.Join(t.TempDir(), "dynamic-uid") // not the host's /run/systemd/dynamic-uid
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	o := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), env: []string{"NEX_NATIVE_SYSTEMD_UID_DIR=" + sd},
		extra: []string{"--agent-restart-limit", "50", "--state", "kv", "--live-restore"}}
	n := startNode(t, o)
	n.waitReady(t)
	loops := make([]crashLoop, services)
	for i := range loops {
		loops[i] = startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	}
	uids := make([]string, services)
	testkit.EventuallyWithin(t, 60*time.Second, "the services run", func() bool {
		for i, c := range loops {
			mains := c.mains()
			if c.runs() != 1 || len(mains) != 1 {
				return false
			}
			if uids[i] = strings.Fields(procStatus(mains[0], "Uid") + " x")[0]; uids[i] == "x" {
				return false
			}
		}
		return true
	})
	taken := func() int {
		k := 0
		for _, uid := range uids {
			if systemdTakes(t, filepath.Join(sd, uid)) {
				k++
			}
		}
		return k
	}
	if k := taken(); k != 0 {
		t.Fatalf("with the nexlet running, systemd's check took %d of %d running workloads' uids %v", k, services, uids)
	}

	nexlet := nexletPID(n.cmd.Process.Pid)
	const connected = "nexlet connected on the uid lock socket"
	switch how {
	case "adopted":
		n = n.restart(t, o)
		// The adopted nexlet connects to the new nexd's socket and sends its locks.
		pid, err := strconv.Atoi(n.logAttr(t, connected, "pid"))
		if err != nil || pid != nexlet {
			t.Fatalf("the uid lock socket's nexlet is pid %d (%v), want the adopted %d", pid, err, nexlet)
		}
	case "reexec":
		readies := strings.Count(n.out.String(), "nex node ready")
		n.mustCtl(t, "node", "reexec")
		testkit.EventuallyWithin(t, 60*time.Second, "the re-executed nexd ready, its nexlet connected again", func() bool {
			out := n.out.String()
			return strings.Count(out, "nex node ready") > readies && strings.Count(out, connected) >= 2
		})
	}
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	// nexd's copies: descriptors of its own on every running workload's lock file.
	testkit.EventuallyWithin(t, 30*time.Second, "nexd holds a copy of every lock", func() bool {
		held := openedBy(n.cmd.Process.Pid, sd)
		for _, uid := range uids {
			if !held[filepath.Join(sd, uid)] {
				return false
			}
		}
		return true
	})
	// nexd held stopped: it neither reaps the killed nexlet nor starts the next one.
	n.signal(t, syscall.SIGSTOP)
	resumed := false
	defer func() {
		if !resumed {
			n.signal(t, syscall.SIGCONT)
		}
	}()
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Its descriptors are closed once it is a zombie (exit_files comes before).
	testkit.EventuallyWithin(t, 10*time.Second, "the nexlet dead", func() bool {
		st := procStatus(nexlet, "State")
		return st == "" || strings.HasPrefix(st, "Z")
	})
	inWindow := taken()
	n.signal(t, syscall.SIGCONT)
	resumed = true

	testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool {
		next := nexletPID(n.cmd.Process.Pid) // nexd's child, also after an adoption
		return next != 0 && next != nexlet
	})
	testkit.EventuallyWithin(t, 60*time.Second, "the services adopted and listed", func() bool {
		listed := 0
		for _, c := range loops {
			if _, ok := c.listed(t, n); ok {
				listed++
			}
		}
		return listed == services
	})
	// The adoption has taken the locks over once the services are listed again.
	afterAdoption := taken()
	notOurs := strings.Count(n.out.String(), "is another process's")
	handed := strings.Contains(n.out.String(), "handed the nexlet the systemd uid locks kept for it")
	inherited := 0
	for _, c := range loops {
		mains := c.mains()
		if len(mains) != 1 || c.runs() != 1 {
			t.Errorf("service %s: %d mains, %d runs after the nexlet's kill", c.id, len(mains), c.runs())
		}
		for _, p := range mains {
			// A workload with a lock's descriptor could let it go (LOCK_UN).
			inherited += len(openedBy(p, sd))
		}
	}
	if inherited != 0 {
		t.Errorf("the services hold %d descriptors of systemd's lock files", inherited)
	}

	body, err := json.Marshal(protocol.StopWorkloadRequest{Namespace: protocol.SystemNamespace})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range loops {
		if _, err := nc.Request(protocol.UndeploySubject(protocol.SystemNamespace, c.id), body, 30*time.Second); err != nil {
			t.Fatalf("stop %s: %v", c.id, err)
		}
	}
	leftovers := func() []string {
		var out []string
		for _, uid := range uids {
			if _, err := os.Lstat(filepath.Join(sd, uid)); err == nil {
				out = append(out, uid)
			}
		}
		return out
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(leftovers()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	left := leftovers()
	t.Logf("nexlet kill -9 with %d services: systemd's check took %d of %d uids in the window (nexd stopped, no nexlet), %d after the adoption (%d adoptions said the lock was another's; nexd handed its copies over: %v); %d lock files left after the stops %v",
		services, inWindow, services, afterAdoption, notOurs, handed, len(left), left)
	if !handed {
		t.Error("nexd did not say it handed its copies of the locks to the next nexlet")
	}
	if inWindow != 0 || afterAdoption != 0 || notOurs != 0 {
		t.Errorf("running workloads' uids open to systemd: %d of %d in the window, %d after adoption; %d adoptions found the lock another's", inWindow, services, afterAdoption, notOurs)
	}
	if len(left) != 0 {
		t.Errorf("%d lock files left after the services stopped: %v", len(left), left)
	}
}

// openedBy lists the files under dir that process pid has open.
func openedBy(pid int, dir string) map[string]bool {
	if d, err := filepath.EvalSymlinks(dir); err == nil {
		dir = d
	}
	fds := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	entries, _ := os.ReadDir(fds)
	out := map[string]bool{}
	for _, e := range entries {
		if l, err := os.Readlink(filepath.Join(fds, e.Name())); err == nil && filepath.Dir(l) == dir {
			out[l] = true
		}
	}
	return out
}
