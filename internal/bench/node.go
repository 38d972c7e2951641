package bench

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

// nodeSpec says how to start one nexd.
type nodeSpec struct {
	Nexd     string   // path of the nexd binary
	Dir      string   // state dir, control socket, notify socket and log live here
	Name     string   // --node-name
	Servers  []string // external NATS; empty starts nexd's embedded server
	Embedded int      // port of the embedded server (NEXD_EMBEDDED_NATS_PORT)
	StateKV  bool     // --state kv
	CgroupV1 string   // --cgroup-root, "" for detection
	LogLevel string
	Extra    []string
	Env      []string // added to nexd's environment
	// RuntimeTmpfs, the nexbench binary: nexd starts through it (runtimeTmpfs) with
	// its runtime paths on tmpfs in a mount namespace of its own.
	RuntimeTmpfs string
}

// nodeProc is a running nexd started by the tool.
type nodeProc struct {
	spec    nodeSpec
	cmd     *exec.Cmd
	group   *procid.Pgrp // its process group, through its pidfd (stop)
	started time.Time
	ready   chan struct{}
	readyAt time.Time
	exited  chan struct{}
	notify  *net.UnixConn
	mu      sync.Mutex
	status  string
}

func (n *nodeProc) Pid() int       { return n.cmd.Process.Pid }
func (n *nodeProc) Socket() string { return filepath.Join(n.spec.Dir, "nexd.sock") }
func (n *nodeProc) LogPath() string {
	return filepath.Join(n.spec.Dir, "nexd.log")
}

// childEnv is the tool's environment minus what would make nexd think it runs under
// systemd in some other unit.
func childEnv(extra ...string) []string {
	drop := []string{"NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", "LISTEN_FDS", "LISTEN_PID",
		"LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
		"CREDENTIALS_DIRECTORY", "NEXD_EMBEDDED_NATS_PORT", "NATS_CONTEXT"}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if slices.Contains(drop, k) || strings.HasPrefix(k, "NEX_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// startNode execs nexd with a notify socket of its own; the returned process has READY
// in n.ready once nexd sends READY=1.
func startNode(spec nodeSpec) (*nodeProc, error) {
	if err := os.MkdirAll(filepath.Join(spec.Dir, "state"), 0o700); err != nil {
		return nil, fmt.Errorf("node %s: %w", spec.Name, err)
	}
	sockPath := filepath.Join(spec.Dir, "notify.sock")
	_ = os.Remove(sockPath)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("node %s: notify socket: %w", spec.Name, err)
	}
	args := []string{"--state-dir", filepath.Join(spec.Dir, "state"), "--control-socket", filepath.Join(spec.Dir, "nexd.sock"),
		"--node-name", spec.Name, "--logger.target", "std", "--logger.level", cmp.Or(spec.LogLevel, "warn")}
	for _, s := range spec.Servers {
		args = append(args, "--nats.servers", s)
	}
	if spec.StateKV {
		args = append(args, "--state", "kv")
	}
	if spec.CgroupV1 != "" {
		args = append(args, "--cgroup-root", spec.CgroupV1)
	}
	args = append(args, spec.Extra...)
	logf, err := os.OpenFile(filepath.Join(spec.Dir, "nexd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("node %s: log file: %w", spec.Name, err)
	}
	cmd := exec.Command(spec.Nexd, args...)
	var unshare uintptr
	var uids *os.File // the reservation of its uid range (ownUIDRange), held while it runs
	if spec.RuntimeTmpfs != "" {
		// nexd's default runtime dir, <state_dir>/run, made here as the mount point.
		run := filepath.Join(spec.Dir, "state", "run")
		err := os.MkdirAll(run, 0o700)
		if err == nil {
			args, uids, err = ownUIDRange(args)
		}
		if err != nil {
			conn.Close()
			logf.Close()
			return nil, fmt.Errorf("node %s: %w", spec.Name, err)
		}
		cmd = exec.Command(spec.RuntimeTmpfs, append([]string{runtimeTmpfsCmd, run, "--", spec.Nexd}, args...)...)
		unshare = syscall.CLONE_NEWNS
	}
	extra := []string{"NOTIFY_SOCKET=" + sockPath}
	if len(spec.Servers) == 0 && spec.Embedded != 0 {
		extra = append(extra, "NEXD_EMBEDDED_NATS_PORT="+strconv.Itoa(spec.Embedded))
	}
	cmd.Env = childEnv(append(extra, spec.Env...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a Ctrl+C of the tool reaches only the tool, which then
	// stops nodes in order; Pdeathsig kills nexd should the tool itself be killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM, Unshareflags: unshare}
	n := &nodeProc{spec: spec, cmd: cmd, ready: make(chan struct{}), exited: make(chan struct{}), notify: conn}
	n.started = time.Now()
	// The node's own timestamps read against the exec (nexbench --keep).
	fmt.Fprintf(logf, "nexbench: exec at %s\n", n.started.UTC().Format(time.RFC3339Nano))
	if err := cmd.Start(); err != nil {
		conn.Close()
		logf.Close()
		if uids != nil {
			uids.Close()
		}
		return nil, fmt.Errorf("node %s: exec %s: %w", spec.Name, spec.Nexd, err)
	}
	logf.Close()
	// Not reaped before the Wait below: the pid names it.
	if id, err := procid.Of(cmd.Process.Pid); err == nil {
		n.group = procid.NewPgrp(id)
	} else {
		n.group = procid.NewPgrp(procid.ID{PID: cmd.Process.Pid}) // ends at once: kills nothing
	}
	// The notify reader ends when its socket closes, after nexd ended; exited waits
	// for it too, so that nothing of the node is still running once exited closed.
	read := make(chan struct{})
	go func() {
		defer close(read)
		n.readNotify()
	}()
	go func() {
		_ = cmd.Wait()
		if uids != nil {
			uids.Close()
		}
		conn.Close()
		<-read
		close(n.exited)
	}()
	return n, nil
}

func (n *nodeProc) readNotify() {
	buf := make([]byte, 4096)
	for {
		k, err := n.notify.Read(buf)
		if err != nil {
			return
		}
		now := time.Now()
		for line := range strings.SplitSeq(string(buf[:k]), "\n") {
			switch {
			case line == "READY=1":
				n.mu.Lock()
				if n.readyAt.IsZero() {
					n.readyAt = now
					close(n.ready)
				}
				n.mu.Unlock()
			case strings.HasPrefix(line, "STATUS="):
				n.mu.Lock()
				n.status = strings.TrimPrefix(line, "STATUS=")
				n.mu.Unlock()
			}
		}
	}
}

// waitReady returns the time from exec to READY=1.
func (n *nodeProc) waitReady(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-n.ready:
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.readyAt.Sub(n.started), nil
	case <-n.exited:
		return 0, fmt.Errorf("node %s exited before READY=1 (%s); log: %s", n.spec.Name, n.cmd.ProcessState, n.tail())
	case <-t.C:
		return 0, fmt.Errorf("node %s: no READY=1 within %s; log: %s", n.spec.Name, timeout, n.tail())
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// tail returns the last lines of the node's log for error messages.
func (n *nodeProc) tail() string {
	b, _ := os.ReadFile(n.LogPath())
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}

// stop sends SIGTERM and waits; after timeout it kills the whole process group.
func (n *nodeProc) stop(timeout time.Duration) error {
	defer n.group.Close()
	select {
	case <-n.exited:
		return nil
	default:
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
		return nil
	case <-time.After(timeout):
		// Through the leader's pidfd: nexd may have ended and been reaped by now,
		// its group's number free for another's.
		_, _ = n.group.Kill()
		<-n.exited
		return fmt.Errorf("node %s did not stop within %s of SIGTERM; killed", n.spec.Name, timeout)
	}
}

// kill9 kills nexd alone with SIGKILL (its nexlet and workloads are left to the kernel's
// parent-death signals and to nexd's recovery) and waits for it to be gone.
func (n *nodeProc) kill9() {
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.exited
}

// ---- /proc readings ----

// procStatus reads VmRSS (bytes) and Threads of pid.
func procStatus(pid int) (rss int64, threads int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		switch k {
		case "VmRSS":
			kb, _ := strconv.ParseInt(f[0], 10, 64)
			rss = kb << 10
		case "Threads":
			threads, _ = strconv.Atoi(f[0])
		}
	}
	return rss, threads, nil
}

// procPSS reads Pss (bytes) from /proc/<pid>/smaps_rollup.
func procPSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Pss:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10, nil
			}
		}
	}
	return 0, errors.New("no Pss line in smaps_rollup")
}

// procCPU returns utime+stime of pid in clock ticks.
func procCPU(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces; fields count from after its closing paren.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("short stat")
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s, nil
}

// clkTck is USER_HZ, 100 on every Linux that Go supports in practice.
const clkTck = 100

// childrenOf lists the direct children of pid.
func childrenOf(pid int) []int {
	var out []int
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, e := range ents {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, e.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if v, err := strconv.Atoi(f); err == nil {
				out = append(out, v)
			}
		}
	}
	return out
}

// cgroupV1Root returns a fresh per-run directory in the v1 memory hierarchy when this
// machine has a writable one (so each node gets its own cgroup subtree and parallel
// nodes or other nexd instances never share one); "" otherwise.
func cgroupV1Root(runID string) string {
	base := "/sys/fs/cgroup/memory"
	if fi, err := os.Stat(filepath.Join(base, "cgroup.procs")); err != nil || fi.Mode()&fs.ModeType != 0 {
		return ""
	}
	if err := syscall.Access(filepath.Join(base, "cgroup.procs"), 2); err != nil {
		return ""
	}
	return filepath.Join(base, "nexbench-"+runID)
}

func execOutput(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = childEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// privateCopy copies the binary src into dir and leaves none of the copy in the page
// cache: a process started from it shares its pages with no process started from src
// (PSS splits shared pages), and reads them in as after a reboot (dropCached).
func privateCopy(src, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	dst := filepath.Join(dir, filepath.Base(src))
	b, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return "", err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return "", err
	}
	// Written back first: dirty pages cannot be dropped.
	if err := f.Sync(); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	dropCached(dst)
	return dst, nil
}

// dropCached drops what the page cache holds of each file (while nothing maps it): a
// binary just written by a build sits there in large folios, and the kernel maps its
// text in whole 2 MiB pages, each counted whole in RSS (about 15 MB more for nexd and
// its nexlet than the same binary read afresh). Dropped, a binary is read in by its
// exec as after a reboot, so two binaries compare alike.
func dropCached(paths ...string) {
	for _, p := range paths {
		if f, err := os.Open(p); err == nil {
			_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			f.Close()
		}
	}
}

// runtimeTmpfsCmd is nexbench's hidden command that starts nexd with its runtime paths on
// tmpfs: nexbench runtime-tmpfs RUNDIR -- NEXD ARGS...
const runtimeTmpfsCmd = "runtime-tmpfs"

// runtimeTmpfs runs in a mount namespace of its own (startNode unshares it): it makes
// its mounts private, so that nothing it mounts reaches the host, puts a tmpfs on
// nexd's runtime dir and on the host-wide paths under /run the native nexlet uses, and
// execs nexd, which keeps the process (its pid, its parent's death signal). On a
// systemd host /run is a tmpfs, so that is where a packaged nexd's runtime dir
// (/run/nex), workload directories and uid leases are; on a host whose /run is on disk
// (this project's test machines: journal-less ext4) each file a deploy cycle makes and
// removes there costs more the more were removed just before. The leases and systemd's
// uid locks are then seen by this nexd's nexlet alone: another nexlet on the host could
// lease the same uid (its /proc walk sees only running processes), so startNode gives
// such a node a uid range of its own (ownUIDRange) unless its arguments name one.
func runtimeTmpfs(args []string, stderr io.Writer) int {
	if len(args) < 3 || args[1] != "--" {
		fmt.Fprintln(stderr, "nexbench runtime-tmpfs: want RUNDIR -- NEXD ARGS...")
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintln(stderr, "nexbench runtime-tmpfs:", err)
		return 1
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fail(fmt.Errorf("private mounts: %w", err))
	}
	for _, m := range []struct {
		path string
		mode os.FileMode
	}{{args[0], 0o700}, {"/run/nex-workloads", 0o711}, {"/run/nex-dynamic-uid", 0o700}, {"/run/systemd/dynamic-uid", 0o755}} {
		if err := os.MkdirAll(m.path, m.mode); err != nil {
			return fail(err)
		}
		if err := unix.Mount("tmpfs", m.path, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("mode=%o", m.mode)); err != nil {
			return fail(fmt.Errorf("tmpfs on %s: %w", m.path, err))
		}
	}
	return fail(unix.Exec(args[2], args[2:], os.Environ()))
}
