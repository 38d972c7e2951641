package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/protocol"
)

// floorNodeCmd is nexbench's hidden command for compare's third side, the floor:
// nexbench floor-node URL NAMESPACE. It answers the client's auction, deploy, list and
// stop with the least a node must do to answer them as nexd and upstream do (decode
// the request, start the process, reply, forward its output to the log feed) and
// nothing else: no identity or signature, no uid, cgroup or limits, no record, no
// nexlet. Its figures are what no node can beat on this machine with this client,
// which says how far below a target lies. Like nexd, it knows each process it started
// by its pid and start time (procid), so that a stop never signals a number an ended
// workload left to another process.
const floorNodeCmd = "floor-node"

// floorBidder is the floor node's bidder id.
const floorBidder = "floor"

// floorNode holds the floor node's running processes by workload id.
type floorNode struct {
	nc *nats.Conn
	ns string
	mu sync.Mutex
	ws map[string]*floorProc
	// closed once stopAll began: its NATS handlers run until the connection closes
	// after it, so a deploy then is refused; deploying counts those under way, which
	// stopAll waits for (their processes are then in ws).
	closed    bool
	deploying sync.WaitGroup
	// The parts of nexd's path added by NEXBENCH_FLOOR (floor_variants.go).
	v      floorVariant
	st     *floorStarter // nil with hop
	hop    *floorHop     // hop only
	minter *floorMinter  // jwt only
}

type floorProc struct {
	id     procid.ID     // its process, read before its reap
	group  *procid.Pgrp  // its process group, through the leader's pidfd (end)
	reaped chan struct{} // nil with hop (the starter reaps)
	read   chan struct{} // closed when the output reader has ended
}

// runFloorNode serves until ctx ends, then ends every process it started.
func runFloorNode(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) != 2 {
		fmt.Fprintln(stderr, "nexbench floor-node: want URL NAMESPACE")
		return 2
	}
	nc, err := dial(args[0], "nexbench-floor")
	if err != nil {
		fmt.Fprintln(stderr, "nexbench floor-node:", err)
		return 1
	}
	defer nc.Close()
	v, err := parseFloorVariant(os.Getenv(floorVariantEnv))
	if err != nil {
		fmt.Fprintln(stderr, "nexbench floor-node:", err)
		return 2
	}
	f := &floorNode{nc: nc, ns: args[1], ws: map[string]*floorProc{}, v: v}
	if v.hop {
		if f.hop, err = startFloorHop(); err != nil {
			fmt.Fprintln(stderr, "nexbench floor-node:", err)
			return 1
		}
		defer f.hop.close()
	} else {
		if f.st, err = newFloorStarter(v, os.Getpid()); err != nil {
			fmt.Fprintln(stderr, "nexbench floor-node:", err)
			return 1
		}
		defer f.st.close()
	}
	if v.jwt {
		if f.minter, err = newFloorMinter(); err != nil {
			fmt.Fprintln(stderr, "nexbench floor-node:", err)
			return 1
		}
	}
	defer f.stopAll()
	for _, s := range []struct {
		subject string
		fn      nats.MsgHandler
	}{
		{protocol.AuctionSubject(f.ns), f.auction},
		{protocol.DeploySubject(f.ns, floorBidder), f.deploy},
		{protocol.WPingSubject(f.ns), f.list},
		{protocol.UndeploySubject(f.ns, "*"), f.undeploy},
	} {
		if _, err := nc.Subscribe(s.subject, s.fn); err != nil {
			fmt.Fprintln(stderr, "nexbench floor-node: subscribe:", err)
			return 1
		}
	}
	if err := nc.Flush(); err != nil {
		fmt.Fprintln(stderr, "nexbench floor-node: flush:", err)
		return 1
	}
	fmt.Fprintln(stdout, "ready")
	<-ctx.Done()
	return 0
}

func (f *floorNode) respond(m *nats.Msg, v any) {
	b, _ := json.Marshal(v)
	_ = m.Respond(b)
}

func (f *floorNode) fail(m *nats.Msg, err error) {
	r := nats.NewMsg(m.Reply)
	r.Header.Set(protocol.HeaderErrorCode, "500")
	r.Header.Set(protocol.HeaderError, err.Error())
	_ = f.nc.PublishMsg(r)
}

func (f *floorNode) auction(m *nats.Msg) {
	var req protocol.AuctionRequest
	if err := json.Unmarshal(m.Data, &req); err != nil {
		f.fail(m, err)
		return
	}
	f.respond(m, protocol.AuctionResponse{BidderID: floorBidder, StartRequestSchema: "", SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleService}})
}

func (f *floorNode) list(m *nats.Msg) { _ = m.Respond([]byte("[]")) }

// deploy starts the run_request's process in a process group of its own (as both nodes
// do), with its stdout on a pipe, and replies once it is started (exec.Cmd.Start returns
// after the child's execve). Its output lines go to the log feed.
func (f *floorNode) deploy(m *nats.Msg) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		f.fail(m, errors.New("floor node stopping"))
		return
	}
	f.deploying.Add(1)
	f.mu.Unlock()
	defer f.deploying.Done()
	var req protocol.StartWorkloadRequest
	if err := json.Unmarshal(m.Data, &req); err != nil {
		f.fail(m, err)
		return
	}
	var rr struct {
		URI  string   `json:"uri"`
		Argv []string `json:"argv"`
	}
	if err := json.Unmarshal([]byte(req.RunRequest), &rr); err != nil {
		f.fail(m, fmt.Errorf("run_request: %w", err))
		return
	}
	path, ok := strings.CutPrefix(rr.URI, "file://")
	if !ok {
		f.fail(m, fmt.Errorf("run_request: uri %q: only file:// here", rr.URI))
		return
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		f.fail(m, err)
		return
	}
	id := nuid.Next()
	if f.minter != nil {
		if err := f.minter.mint(f.ns, id); err != nil {
			pw.Close()
			pr.Close()
			f.fail(m, err)
			return
		}
	}
	p := &floorProc{read: make(chan struct{})}
	if f.hop != nil {
		p.id, err = f.hop.start(path, rr.Argv, pw)
	} else {
		p.id, p.reaped, err = f.st.start(path, rr.Argv, pw)
	}
	pw.Close()
	if err != nil {
		pr.Close()
		f.fail(m, err)
		return
	}
	// Known by its leader's identity from now on: a leader reaped (with hop, by the
	// starter) and its pid given to another process before this open leaves a group
	// that has ended, which kills nothing.
	p.group = procid.NewPgrp(p.id)
	f.mu.Lock()
	f.ws[id] = p
	f.mu.Unlock()
	f.respond(m, protocol.StartWorkloadResponse{ID: id, Name: req.Name})
	subject := strings.TrimSuffix(protocol.LogsWildcard(f.ns, id), "*") + "stdout"
	// Ends at EOF, when the process is gone (undeploy and stopAll wait for it).
	go func() {
		defer close(p.read)
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			_ = f.nc.Publish(subject, sc.Bytes())
		}
	}()
}

func (f *floorNode) undeploy(m *nats.Msg) {
	id := protocol.Token(m.Subject, 5)
	f.mu.Lock()
	p := f.ws[id]
	delete(f.ws, id)
	f.mu.Unlock()
	if p == nil {
		f.fail(m, errors.New("workload not found"))
		return
	}
	p.end()
	f.respond(m, protocol.StopWorkloadResponse{ID: id, Stopped: true, Message: "stopped", WorkloadType: "native"})
}

// end stops the workload as nexd does and waits for its process and its reader: a
// SIGTERM to its process by its identity (procid.Signal), then, once it ended or after
// 5 s, a SIGKILL to its process group through the leader's pidfd (procid.Pgrp), which
// ends what it left there. Never by the bare numbers: a workload that ended by itself
// left its pid and its group's number free, and a kill(-pid) then hit whatever group
// had it (TestFloorStopSparesRecycledNumber). (With hop the starter reaps it: a pidfd
// says it exited, see exited.)
func (p *floorProc) end() {
	defer p.group.Close()
	done := p.reaped
	if done == nil {
		done = exited(p.id, p.read)
	}
	_ = procid.Signal(p.id, unix.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
	_, _ = p.group.Kill()
	<-done
	<-p.read
}

// exited is closed once id's process has exited (its zombie too): with hop the
// starter, not the floor node, is its parent and reaps it, and a pidfd tells the floor
// node its end, so that what it left in its group (which may hold its output open) is
// killed then, not after the 5 s. Where no pidfd watches it (none to be had), the end
// of its output (read) stands in, as before. The watch ends with the process.
func exited(id procid.ID, read chan struct{}) chan struct{} {
	ch := make(chan struct{})
	f, err := procid.OpenPidfd(id)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			return read
		}
		close(ch) // gone: ended, its zombie too
		return ch
	}
	go func() {
		defer close(ch)
		defer f.Close()
		_ = procid.WaitPidfd(f)
	}()
	return ch
}

// stopAll ends every process: those of the deploys under way too, and no deploy
// starts one after it began.
func (f *floorNode) stopAll() {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	f.deploying.Wait() // no Add after closed, so none races this Wait
	f.mu.Lock()
	ws := f.ws
	f.ws = map[string]*floorProc{}
	f.mu.Unlock()
	for _, p := range ws {
		p.end()
	}
}

// floorProcess is a running floor node.
type floorProcess struct {
	cmd  *exec.Cmd
	done chan struct{}
	// Set before done closes: what removeFloorGroup did once the floor node ended.
	leftKilled int
	leftErr    error
}

// startFloor starts `self floor-node url ns` and waits for it to serve; env is added to
// nexbench's environment (NEXBENCH_FLOOR=..., see floor_variants.go).
func startFloor(ctx context.Context, self, url, ns string, env ...string) (*floorProcess, error) {
	cmd := exec.Command(self, floorNodeCmd, url, ns)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	// The floor node's variant, as it will read it (the last setting wins), says
	// whether it makes cgroups that a kill would leave behind.
	var withGroups bool
	for _, e := range cmd.Environ() {
		if val, ok := strings.CutPrefix(e, floorVariantEnv+"="); ok {
			v, _ := parseFloorVariant(val) // a wrong value is the floor node's to refuse
			withGroups = v.cgroup
		}
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("floor node: %w", err)
	}
	f := &floorProcess{cmd: cmd, done: make(chan struct{})}
	line := make(chan error, 1)
	go func() {
		// The "ready" line, then the rest is drained until the process ends.
		r := bufio.NewReader(out)
		s, err := r.ReadString('\n')
		if err == nil && s != "ready\n" {
			err = fmt.Errorf("floor node said %q", s)
		}
		line <- err
		_, _ = io.Copy(io.Discard, r)
		_ = cmd.Wait()
		if withGroups {
			f.leftKilled, f.leftErr = removeFloorGroup(cmd.Process.Pid)
		}
		close(f.done)
	}()
	select {
	case err := <-line:
		if err != nil {
			return nil, errors.Join(fmt.Errorf("floor node: %w", err), f.stop())
		}
		return f, nil
	case <-ctx.Done():
		return nil, errors.Join(ctx.Err(), f.stop())
	case <-time.After(30 * time.Second):
		return nil, errors.Join(errors.New("floor node: not serving after 30s"), f.stop())
	}
}

// stop ends the floor node (which ends its processes) and waits for it; killed, it
// left processes and cgroups, which are removed then: the error names what was left.
func (f *floorProcess) stop() error {
	_ = f.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-f.done:
	case <-time.After(10 * time.Second):
		_ = f.cmd.Process.Kill()
		<-f.done
	}
	return f.left()
}

// left says what the ended floor node left behind: the processes removeFloorGroup
// killed, or what it could not remove.
func (f *floorProcess) left() error {
	if f.leftErr != nil {
		return f.leftErr
	}
	if f.leftKilled > 0 {
		return fmt.Errorf("floor node (pid %d) ended leaving %d processes in its cgroup: killed", f.cmd.Process.Pid, f.leftKilled)
	}
	return nil
}
