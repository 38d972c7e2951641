package bench

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/nats-io/nkeys"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/procid"
)

// floorVariantEnv adds parts of nexd's deploy path to the floor, one by one, to find
// where nexd's time beyond the floor goes: NEXBENCH_FLOOR=uid,cgroup,hop,jwt (any
// subset, comma-separated) in nexbench's environment, which its floor-node inherits.
//   - uid: the child switches to a uid and gid of its own (one of 64, above 61000)
//     with no supplementary groups, as a workload's dynamic user;
//   - cgroup: the child is forked from a thread of a cgroup.ForkPool already in a
//     fresh v1 group, renamed to the workload's (v2: clone3 into a new group);
//   - hop: the start is made by a second Go process (floor-starter) on a socket
//     pair, the stdout pipe's write end passed with the request, as nexd hands a
//     start to its native nexlet;
//   - jwt: a NATS user with its own nkey is minted and signed per deploy.
const floorVariantEnv = "NEXBENCH_FLOOR"

// floorStarterCmd is the hidden command of the hop variant's second process: it reads
// start requests on descriptor 3 (a socket pair) and answers each with the pid.
const floorStarterCmd = "floor-starter"

type floorVariant struct {
	uid, cgroup, hop, jwt bool
}

func (v floorVariant) String() string {
	var s []string
	for _, p := range []struct {
		on   bool
		name string
	}{{v.uid, "uid"}, {v.cgroup, "cgroup"}, {v.hop, "hop"}, {v.jwt, "jwt"}} {
		if p.on {
			s = append(s, p.name)
		}
	}
	return strings.Join(s, ",")
}

func parseFloorVariant(s string) (floorVariant, error) {
	var v floorVariant
	for _, p := range strings.Split(s, ",") {
		switch strings.TrimSpace(p) {
		case "":
		case "uid":
			v.uid = true
		case "cgroup":
			v.cgroup = true
		case "hop":
			v.hop = true
		case "jwt":
			v.jwt = true
		default:
			return v, fmt.Errorf("%s: unknown part %q (uid, cgroup, hop, jwt)", floorVariantEnv, p)
		}
	}
	return v, nil
}

// floorStarter starts processes the floor's way plus the variant's uid and cgroup.
type floorStarter struct {
	v    floorVariant
	m    *cgroup.Manager
	pool *cgroup.ForkPool
	seq  atomic.Uint64
	wg   sync.WaitGroup // the reapers
}

// floorGroup names the cgroup root of the floor node with pid floorPid (nexd/<name> in
// each v1 hierarchy): its starter's too with hop, so that the parent, which knows the
// pid, can remove what a killed floor node left (removeFloorGroup).
func floorGroup(floorPid int) string { return fmt.Sprintf("nexbench-floor-%d", floorPid) }

// newFloorStarter starts processes for the floor node with pid floorPid.
func newFloorStarter(v floorVariant, floorPid int) (*floorStarter, error) {
	s := &floorStarter{v: v}
	if v.cgroup {
		m, err := cgroup.DetectFor("", floorGroup(floorPid), slog.New(slog.DiscardHandler))
		if err != nil {
			return nil, fmt.Errorf("cgroup: %w", err)
		}
		s.m, s.pool = m, m.NewForkPool(2)
	}
	return s, nil
}

// start starts path with argv, its stdout on out, and reaps it (removing its group)
// once it ends; done is closed then. id is its process's identity, read before the
// reap: what the floor node knows its process group by (procid.Pgrp), never its number
// alone.
func (s *floorStarter) start(path string, argv []string, out *os.File) (id procid.ID, done chan struct{}, err error) {
	n := s.seq.Add(1)
	cmd := exec.Command(path, argv...)
	cmd.Stdout = out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if s.v.uid {
		u := uint32(61000 + n%64)
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: u, Gid: u, Groups: []uint32{}}
	}
	var g *cgroup.Group
	if s.pool != nil {
		if g, err = s.pool.Create(fmt.Sprintf("w%d", n), cgroup.Limits{}); err != nil {
			return procid.ID{}, nil, err
		}
		err = g.Start(cmd)
	} else {
		err = cmd.Start()
	}
	if err == nil {
		// Our child, not reaped before the reaper below: its pid and start time
		// name it. Unnamed, its group could not be told from a stranger's later,
		// nor stopped: it does not run (as the native nexlet's pgroup.start).
		if id, err = procid.Of(cmd.Process.Pid); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			err = fmt.Errorf("process group of pid %d: %w", cmd.Process.Pid, err)
		}
	}
	if err != nil {
		if g != nil {
			_ = g.Remove()
		}
		return procid.ID{}, nil, err
	}
	done = make(chan struct{})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(done)
		_ = cmd.Wait()
		if g != nil {
			_ = g.Remove()
		}
	}()
	return id, done, nil
}

// close waits for the reapers (the processes are ended by then) and removes the groups.
func (s *floorStarter) close() {
	s.wg.Wait()
	if s.pool != nil {
		s.pool.Close()
		_ = s.m.RemoveOwnRoot()
	}
}

// floorHop is the floor node's end of the socket pair to its floor-starter.
type floorHop struct {
	mu   sync.Mutex // one request at a time
	conn *net.UnixConn
	cmd  *exec.Cmd
}

type floorHopReq struct {
	Path string   `json:"path"`
	Argv []string `json:"argv"`
}

type floorHopResp struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"` // its start time, read before the starter's reap
	Err   string `json:"err,omitempty"`
}

func startFloorHop() (*floorHop, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "hop"), os.NewFile(uintptr(fds[1]), "hop-starter")
	defer theirs.Close()
	self, err := os.Executable()
	if err != nil {
		mine.Close()
		return nil, err
	}
	cmd := exec.Command(self, floorStarterCmd, strconv.Itoa(os.Getpid()))
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		mine.Close()
		return nil, fmt.Errorf("floor starter: %w", err)
	}
	c, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, err
	}
	return &floorHop{conn: c.(*net.UnixConn), cmd: cmd}, nil
}

// start asks the starter to start path with out as its stdout; it returns the
// process's identity, which the starter read before it could reap it.
func (h *floorHop) start(path string, argv []string, out *os.File) (procid.ID, error) {
	b, _ := json.Marshal(floorHopReq{Path: path, Argv: argv})
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, _, err := h.conn.WriteMsgUnix(b, unix.UnixRights(int(out.Fd())), nil); err != nil {
		return procid.ID{}, fmt.Errorf("hop: %w", err)
	}
	buf := make([]byte, 4096)
	k, err := h.conn.Read(buf)
	if err != nil {
		return procid.ID{}, fmt.Errorf("hop: %w", err)
	}
	var r floorHopResp
	if err := json.Unmarshal(buf[:k], &r); err != nil {
		return procid.ID{}, fmt.Errorf("hop: %w", err)
	}
	if r.Err != "" {
		return procid.ID{}, errors.New(r.Err)
	}
	return procid.ID{PID: r.PID, Start: r.Start}, nil
}

// close ends the starter: it reaps what it started first (the floor node ended them).
func (h *floorHop) close() {
	h.conn.Close()
	_ = h.cmd.Wait()
}

// runFloorStarter serves start requests on descriptor 3 until it closes; args hold the
// floor node's pid.
func runFloorStarter(args []string, stderr io.Writer) int {
	v, err := parseFloorVariant(os.Getenv(floorVariantEnv))
	if err != nil {
		fmt.Fprintln(stderr, "nexbench floor-starter:", err)
		return 2
	}
	var floorPid int
	if len(args) == 1 {
		floorPid, err = strconv.Atoi(args[0])
	}
	if len(args) != 1 || err != nil || floorPid <= 0 {
		fmt.Fprintf(stderr, "nexbench floor-starter: want the floor node's pid, not %q\n", args)
		return 2
	}
	s, err := newFloorStarter(v, floorPid)
	if err != nil {
		fmt.Fprintln(stderr, "nexbench floor-starter:", err)
		return 1
	}
	defer s.close()
	f := os.NewFile(3, "hop")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		fmt.Fprintln(stderr, "nexbench floor-starter:", err)
		return 1
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4))
	for {
		k, ok, _, _, err := conn.ReadMsgUnix(buf, oob)
		if err != nil || k == 0 {
			return 0
		}
		resp := func() floorHopResp {
			var out *os.File
			if msgs, err := unix.ParseSocketControlMessage(oob[:ok]); err == nil && len(msgs) == 1 {
				if fds, err := unix.ParseUnixRights(&msgs[0]); err == nil && len(fds) == 1 {
					out = os.NewFile(uintptr(fds[0]), "stdout")
				}
			}
			if out == nil {
				return floorHopResp{Err: "no stdout descriptor"}
			}
			defer out.Close()
			var req floorHopReq
			if err := json.Unmarshal(buf[:k], &req); err != nil {
				return floorHopResp{Err: err.Error()}
			}
			id, _, err := s.start(req.Path, req.Argv, out)
			if err != nil {
				return floorHopResp{Err: err.Error()}
			}
			return floorHopResp{PID: id.PID, Start: id.Start}
		}()
		b, _ := json.Marshal(resp)
		if _, err := conn.Write(b); err != nil {
			return 0
		}
	}
}

// floorMinter mints a workload's NATS user per deploy with nexd's own signing-key
// minter (daemon/mint), as nexd does in its deploy handler.
type floorMinter struct {
	m *mint.SigningKeyMinter
}

func newFloorMinter() (*floorMinter, error) {
	acc, err := nkeys.CreateAccount()
	if err != nil {
		return nil, fmt.Errorf("floor minter: account key: %w", err)
	}
	accPub, _ := acc.PublicKey()
	sk, err := nkeys.CreateAccount()
	if err != nil {
		return nil, fmt.Errorf("floor minter: signing key: %w", err)
	}
	seed, _ := sk.Seed()
	m, err := mint.NewSigningKeyMinter(string(seed), accPub, mint.Options{})
	if err != nil {
		return nil, fmt.Errorf("floor minter: %w", err)
	}
	return &floorMinter{m: m}, nil
}

func (m *floorMinter) mint(ns, id string) error {
	_, err := m.m.MintWorkload(ns, id)
	return err
}

// removeFloorGroup kills what is left in the v1 cgroup root of the floor node with pid
// floorPid and removes it: once the floor node ended, killed or not, so that a floor node
// killed before it could end its workloads and remove its groups (compare's SIGKILL
// after its stop's wait, a kill -9) leaves neither. It returns how many processes it
// killed. On v2 the floor's groups are below its own cgroup, which is its parent's:
// nothing of it is the floor's alone to remove, and nothing is done.
func removeFloorGroup(floorPid int) (killed int, err error) {
	m, err := cgroup.DetectFor("", floorGroup(floorPid), slog.New(slog.DiscardHandler))
	if err != nil {
		return 0, fmt.Errorf("floor node's cgroup: %w", err)
	}
	if m.Mode() != cgroup.ModeV1 {
		return 0, nil
	}
	if killed, err = m.CleanupStale(""); err != nil {
		return killed, fmt.Errorf("floor node's cgroup %s: %w", m.Path(), err)
	}
	if err := m.RemoveOwnRoot(); err != nil {
		return killed, fmt.Errorf("floor node's cgroup %s: %w", m.Path(), err)
	}
	return killed, nil
}
