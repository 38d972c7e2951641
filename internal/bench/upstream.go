package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
)

// upstreamReadyLog is the line upstream's node logs once its agents run; it has no
// other readiness signal.
const upstreamReadyLog = "nex node ready"

// upstreamProc is an upstream `nex node up` started by the tool. Its native agent runs
// inside the same process, so its pid alone is the node's footprint.
type upstreamProc struct {
	cmd     *exec.Cmd
	id      procid.ID    // the node's process
	group   *procid.Pgrp // its process group, through its pidfd (stop)
	log     string
	started time.Time
	readyAt time.Time
	ready   chan struct{}
	exited  chan struct{}
	copied  sync.WaitGroup
}

func (u *upstreamProc) Pid() int { return u.cmd.Process.Pid }

// startUpstream execs `nex node up` against url, copying its output to dir/nex.log and
// noting when the ready line appears.
func startUpstream(bin, dir, name, url string) (*upstreamProc, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("upstream node %s: %w", name, err)
	}
	logPath := filepath.Join(dir, "nex.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("upstream node %s: log file: %w", name, err)
	}
	cmd := exec.Command(bin, "--disable-upgrade-check", "node", "up", "--nats.servers", url,
		"--node-name", name, "--logger.level", "info")
	cmd.Dir = dir
	cmd.Env = childEnv("HOME=" + dir)
	pr, pw, err := os.Pipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	// Upstream traps only SIGINT; Pdeathsig ends it should the tool be killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	u := &upstreamProc{cmd: cmd, log: logPath, ready: make(chan struct{}), exited: make(chan struct{})}
	u.started = time.Now()
	if err := cmd.Start(); err != nil {
		logf.Close()
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("upstream node %s: exec %s: %w", name, bin, err)
	}
	pw.Close()
	// Not reaped before the Wait below: the pid names it. Without its start time
	// (gone already), the group ends at once and stop kills nothing by its number.
	u.id, _ = procid.Of(cmd.Process.Pid)
	u.id.PID = cmd.Process.Pid
	u.group = procid.NewPgrp(u.id)
	u.copied.Add(1)
	go func() {
		defer u.copied.Done()
		defer logf.Close()
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		seen := false
		for sc.Scan() {
			line := sc.Text()
			if !seen && strings.Contains(line, upstreamReadyLog) {
				seen = true
				u.readyAt = time.Now()
				close(u.ready)
			}
			_, _ = io.WriteString(logf, line+"\n")
		}
	}()
	go func() {
		_ = cmd.Wait()
		close(u.exited)
	}()
	return u, nil
}

// waitReady returns the time from exec to the ready line.
func (u *upstreamProc) waitReady(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-u.ready:
		return u.readyAt.Sub(u.started), nil
	case <-u.exited:
		return 0, fmt.Errorf("upstream node exited before %q (%s); log: %s", upstreamReadyLog, u.cmd.ProcessState, tailFile(u.log))
	case <-t.C:
		return 0, fmt.Errorf("upstream node: no %q within %s; log: %s", upstreamReadyLog, timeout, tailFile(u.log))
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// stop sends SIGINT (upstream's shutdown signal), then kills the process group and
// whatever workloads (its children, in process groups of their own) outlived it. Never
// by the bare numbers, which the ended node's and workloads' were free to go to other
// processes by then: the group through its leader's pidfd (procid.Pgrp), the children
// pinned by pidfds while still the node's (procid.Pin).
func (u *upstreamProc) stop(timeout time.Duration) error {
	defer u.copied.Wait()
	listed := childrenOf(u.id.PID)
	kids := procid.Pin(listed)
	// Pinned, then checked: still children of the number's process, and that is
	// still the node (its start time, a zombie's too), which held the number all
	// along: they are the node's. Once the node is reaped, the number and its
	// children are another process's.
	var mine []int
	for _, k := range listed {
		if st, err := procid.ReadStat(k); err == nil && st.PPID == u.id.PID {
			mine = append(mine, k)
		}
	}
	if st, err := procid.ReadStat(u.id.PID); err != nil || st.Start != u.id.Start {
		mine = nil
	}
	defer func() {
		_, _ = u.group.Kill()
		u.group.Close()
		_, _ = kids.Signal(syscall.SIGKILL, func(k int) bool { return slices.Contains(mine, k) })
		kids.Close()
	}()
	select {
	case <-u.exited:
		return nil
	default:
	}
	_ = u.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-u.exited:
		return nil
	case <-time.After(timeout):
		_, _ = u.group.Kill()
		<-u.exited
		return fmt.Errorf("upstream node did not stop within %s of SIGINT; killed", timeout)
	}
}

// tailFile returns the last lines of a log for error messages.
func tailFile(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}
