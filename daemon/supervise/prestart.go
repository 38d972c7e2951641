package supervise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/earlynexlet"
)

// A nexlet may be pre-started: its process is exec'd at nexd's main, before nexd knows
// its node id, cgroups, credentials or output FIFOs, so that the runtime start and
// package init of its binary (26-32 ms on a PVM guest, README "Ready") overlap with
// nexd's own set-up. It then waits in its main, before it runs anything of the nexlet,
// reading a socket pair (descriptor 3, named by EnvHandoff) for its hand-off.
//
// The first start of the matching nexlet (Spec.Path and Args equal) takes it instead of
// forking: the process is placed in its cgroup, recorded, given its oom_score_adj
// (everything a fork does before the child runs), and only then handed its whole
// environment and its stdout, stderr and local channel (descriptors 1, 2 and 3, as a
// fork gives them) over the pair; it sets them up and runs as a freshly exec'd nexlet
// would. Restarts fork as before. When nexd ends or fails before the hand-off, the
// pair's other end closes and the waiting process exits; a pre-started process that is
// not used (another path, a nexlet adopted from the previous nexd, a stop) is killed.

// EnvHandoff names the descriptor on which a pre-started nexlet waits for its hand-off.
const EnvHandoff = earlynexlet.EnvHandoff

// handoffFD is the pre-started process's descriptor of its end of the pair.
const handoffFD = earlynexlet.HandoffFD

// maxHandoff bounds the hand-off message (the environment, NUL-separated).
const maxHandoff = 64 << 10

// runtimeEnv are the variables the Go runtime reads before main: a pre-started process
// read them at its exec, so a hand-off whose environment sets them otherwise is not
// made (the nexlet is forked anew).
func runtimeEnv() [6]string {
	return [...]string{"GOGC", "GOMEMLIMIT", "GODEBUG", "GOMAXPROCS", "GOTRACEBACK", "GORACE"}
}

// Prestarted is a nexlet process started ahead of its first start (Prestart), until a
// Supervisor takes it or it is discarded.
type Prestarted struct {
	path string
	args []string
	env  map[string]string // its exec environment (without EnvHandoff)
	// procsLimited: this process's GOMAXPROCS was below the CPU count when it started
	// p (a CPU limit on its cgroup, or $GOMAXPROCS): p's runtime sized its own by the
	// CPU limit of that cgroup, read once at exec (Go reads its leaf group's limit only,
	// and never again after a move).
	procsLimited bool
	proc         *os.Process
	pair         *os.File // nexd's end of the hand-off pair
	// pairMu orders what goes on the pair: a preview, then the hand-off, or the
	// close. Not mu, which warmAttach holds through a grace period.
	pairMu     sync.Mutex
	pairClosed bool // the hand-off was sent or the pair closed: no preview
	// warmed is closed once warmAttach (or the warm-up begun at nexd's main) is done:
	// the hand-off's cgroup move waits for it
	// (its no-op move must not follow the real one).
	warmed <-chan struct{}

	done   chan struct{}    // closed once the process was reaped
	werr   error            // proc.Wait's error, set before done closes
	pstate *os.ProcessState // proc.Wait's state, set before done closes

	mu    sync.Mutex
	state int // prestartWaiting, prestartTaken, prestartDiscarded
	// ended: the process ended and is about to be reaped (set before proc.Wait; while
	// it is false under mu, the pid is this process's, alive or a zombie)
	ended    bool
	exited   bool   // proc.Wait returned
	onWaited func() // called after proc.Wait returned (the reaper's release)
}

const (
	prestartWaiting = iota
	prestartTaken
	prestartDiscarded
)

// Prestart execs path with args and env (the variables its runtime reads before main,
// and any other that is no secret) as a nexlet that waits for its hand-off
// (earlynexlet.Fork). Like New, it first raises RLIMIT_NOFILE and marks inherited
// descriptors close-on-exec, and goes on when it cannot, so that the process inherits
// what a supervised start gives it. Its stderr is stderr until the hand-off (a runtime
// crash before it is seen); stdin and stdout are /dev/null.
func Prestart(path string, args []string, env map[string]string, stderr *os.File, log *slog.Logger) (*Prestarted, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	raiseNofile(log)
	closeInheritedOnExec(log)
	e, err := earlynexlet.Fork(path, args, env, stderr)
	if err != nil {
		return nil, fmt.Errorf("prestart %s: %w", path, err)
	}
	p, err := watchEarly(e)
	if err != nil {
		e.Discard()
		return nil, err
	}
	return p, nil
}

// PrestartedEarly takes over e, a native nexlet exec'd at nexd's package init
// (earlynexlet), as a Prestarted, when what its runtime read at exec is what env (the
// pre-start's environment at main) sets. Otherwise it returns the first variable that
// differs, and e stays the caller's.
func PrestartedEarly(e *earlynexlet.Process, env map[string]string) (*Prestarted, string, error) {
	for _, k := range runtimeEnv() {
		if e.Env[k] != env[k] {
			return nil, k, nil
		}
	}
	p, err := watchEarly(e)
	return p, "", err
}

// watchEarly makes e a Prestarted and watches it; on an error e stays the caller's.
func watchEarly(e *earlynexlet.Process) (*Prestarted, error) {
	proc, err := os.FindProcess(e.Pid) // our child, unreaped: its pid is its own
	if err != nil {
		return nil, fmt.Errorf("pre-started pid %d: %w", e.Pid, err)
	}
	p := &Prestarted{path: e.Path, args: slices.Clone(e.Args), env: maps.Clone(e.Env),
		proc: proc, pair: e.Pair, procsLimited: e.ProcsLimited}
	if w := e.Warmed(); w != nil {
		p.warmed = w // its warm-up began at nexd's main (earlynexlet.Process.Warm)
	}
	return watchPrestarted(p), nil
}

// watchPrestarted starts p's waiter, which ends with the process: taken, it is the
// nexlet; discarded, it is killed.
func watchPrestarted(p *Prestarted) *Prestarted {
	p.done = make(chan struct{})
	if p.warmed == nil {
		w := make(chan struct{})
		p.warmed = w
		go p.warmAttach(w)
	}
	go func() {
		// Its end is seen before it is reaped, so that whileUnreaped never acts on a
		// pid freed for another process.
		var info unix.Siginfo
		for errors.Is(unix.Waitid(unix.P_PID, p.Pid(), &info, unix.WEXITED|unix.WNOWAIT, nil), unix.EINTR) {
		}
		p.mu.Lock()
		p.ended = true
		p.mu.Unlock()
		// A warm-up begun before p was watched (earlynexlet's) does not look at ended:
		// the pid stays p's until it is done.
		<-p.warmed
		ps, err := p.proc.Wait()
		p.mu.Lock()
		p.exited = true
		hook := p.onWaited
		p.mu.Unlock()
		if hook != nil {
			hook()
		}
		p.werr, p.pstate = err, ps
		close(p.done)
	}()
	return p
}

// warmAttach readies the kernel's cgroup attach lock for the hand-off's move of the
// process into its group (earlynexlet.WarmAttach), while nexd still builds itself: that
// move was the first after a quiet while and waited for an RCU grace period, 5–15 ms
// of READY on a loaded 2-vCPU PVM guest. A failure (no cgroups, no right to move) only
// leaves the wait where it was. Done under whileUnreaped: the pid is this process's.
func (p *Prestarted) warmAttach(done chan<- struct{}) {
	defer close(done)
	_ = p.whileUnreaped(earlynexlet.WarmAttach)
}

// AwaitWarm returns once p's cgroup warm-up (warmAttach, or earlynexlet's begun at
// nexd's package init) is done, or with an error naming it once ctx ends; at once for
// a nil p. The warm-up writes p's pid into the cgroup it read before: on v2 that is the
// node's cgroup root, which the nexlets' manager empties before it enables controllers
// there (cgroup.Manager.EnterSupervisor waits for this).
func (p *Prestarted) AwaitWarm(ctx context.Context) error {
	if p == nil {
		return nil
	}
	select {
	case <-p.warmed:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the pre-started nexlet's (pid %d) cgroup warm-up: %w", p.Pid(), ctx.Err())
	}
}

// Pid is the pre-started process's pid.
func (p *Prestarted) Pid() int { return p.proc.Pid }

// Discard kills the pre-started process and waits for it, unless a Supervisor took it
// (then it does nothing). It may be called more than once.
func (p *Prestarted) Discard() {
	if p == nil {
		return
	}
	p.mu.Lock()
	if p.state != prestartWaiting {
		p.mu.Unlock()
		return
	}
	p.state = prestartDiscarded
	p.mu.Unlock()
	p.closePair() // a process that reached its main reads the end: it exits
	_ = p.proc.Kill()
	<-p.done
	<-p.warmed
}

// closePair closes nexd's end of the pair: no preview follows.
func (p *Prestarted) closePair() {
	p.pairMu.Lock()
	defer p.pairMu.Unlock()
	p.pairClosed = true
	p.pair.Close()
}

// matches says whether spec runs what p pre-started.
func (p *Prestarted) matches(spec Spec) bool {
	return p.path == spec.Path && slices.Equal(p.args, spec.Args)
}

// take makes p the caller's (a start of the nexlet it matches), unless it was discarded.
func (p *Prestarted) take() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state != prestartWaiting {
		return false
	}
	p.state = prestartTaken
	return true
}

// release gives a taken p up: it is killed and waited for (a hand-off that failed).
func (p *Prestarted) release() {
	p.closePair()
	_ = p.proc.Kill()
	<-p.done
	<-p.warmed
}

// whileUnreaped runs f on the process's pid while that pid cannot be another
// process's: the process runs, or has ended but is not reaped (its reap waits for f).
// A process that ended before is not given to f: once reaped, its pid may be any
// other process's (TestPrestartedDeadPidReusedNotPlaced).
func (p *Prestarted) whileUnreaped(f func(pid int) error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended {
		return fmt.Errorf("pre-started pid %d ended before its hand-off", p.Pid())
	}
	return f(p.Pid())
}

// setOnWaited makes hook run once proc.Wait has returned; it reports false (and does
// not keep hook) when it has already.
func (p *Prestarted) setOnWaited(hook func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return false
	}
	p.onWaited = hook
	return true
}

// runtimeMismatch names a variable the Go runtime reads before main that env (a start's
// whole environment, KEY=VALUE) sets otherwise than p's exec environment did.
func (p *Prestarted) runtimeMismatch(env []string) string {
	got := map[string]string{}
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			got[k] = v
		}
	}
	for _, k := range runtimeEnv() {
		if got[k] != p.env[k] {
			return k
		}
	}
	return ""
}

// handOff sends the process its environment and its stdout, stderr and (ch, when not
// nil) local channel, and closes nexd's end of the pair. The process must be placed,
// recorded and hardened before: it runs the nexlet as soon as it has read this.
func (p *Prestarted) handOff(env []string, stdout, stderr, ch *os.File) error {
	p.pairMu.Lock()
	defer p.pairMu.Unlock()
	p.pairClosed = true
	defer p.pair.Close()
	msg := nulJoined(env)
	if len(msg) > maxHandoff {
		return fmt.Errorf("hand-off: environment of %d bytes, more than %d", len(msg), maxHandoff)
	}
	fds := []int{int(stdout.Fd()), int(stderr.Fd())}
	if ch != nil {
		fds = append(fds, int(ch.Fd()))
	}
	if err := p.send(msg, unix.UnixRights(fds...)); err != nil {
		return fmt.Errorf("hand-off to pid %d: %w", p.Pid(), err)
	}
	return nil
}

// send writes one message on the pair (pairMu held).
func (p *Prestarted) send(msg, oob []byte) error {
	rc, err := p.pair.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = unix.Sendmsg(int(fd), msg, oob, nil, 0)
		return !errors.Is(serr, unix.EAGAIN)
	}); err != nil {
		return err
	}
	return serr
}

// Preview tells the process, while it waits, what its start's environment will set of
// env's variables (KEY=VALUE; nothing secret): it may build ahead what depends on them,
// and checks them against its hand-off's (native.Ahead). Only before the hand-off
// was sent or the process discarded: an error says nothing was sent.
func (p *Prestarted) Preview(env []string) error {
	msg := nulJoined(env)
	if len(msg) == 0 || len(msg) > maxHandoff {
		return fmt.Errorf("preview of %d bytes", len(msg))
	}
	// The hand-off, or a close, comes after this.
	p.pairMu.Lock()
	defer p.pairMu.Unlock()
	if p.pairClosed {
		return errors.New("preview: the pre-started process was handed its start or discarded")
	}
	if err := p.send(msg, nil); err != nil {
		return fmt.Errorf("preview to pid %d: %w", p.Pid(), err)
	}
	return nil
}

// nulJoined is env as the pair carries it: each KEY=VALUE followed by a NUL.
func nulJoined(env []string) []byte {
	var msg []byte
	for _, kv := range env {
		msg = append(msg, kv...)
		msg = append(msg, 0)
	}
	return msg
}

// nulSplit is nulJoined's inverse.
func nulSplit(msg []byte) map[string]string {
	env := map[string]string{}
	for kv := range strings.SplitSeq(string(msg), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok && k != "" {
			env[k] = v
		}
	}
	return env
}

// AwaitHandoff is the pre-started nexlet's side (EnvHandoff set): it waits for the
// hand-off, puts the descriptors it got at 1, 2 and 3 and replaces the environment with
// the one it got, so that what runs next sees what a fork and exec would have given it.
// A preview (Prestarted.Preview: a message without descriptors) that comes first goes
// to preview, when not nil, which must not block.
// ok false: no hand-off comes (nexd ended, or discarded this process); exit with code.
func AwaitHandoff(preview func(env map[string]string)) (code int, ok bool) {
	fd, err := strconv.Atoi(os.Getenv(EnvHandoff))
	if err != nil || fd != handoffFD {
		fmt.Fprintf(os.Stderr, "nexd nexlet: %s=%q is not the hand-off descriptor\n", EnvHandoff, os.Getenv(EnvHandoff))
		return 2, false
	}
	buf := make([]byte, maxHandoff+1)
	oob := make([]byte, unix.CmsgSpace(3*4))
	var n, oobn, flags int
	for previews := 0; ; {
		n, oobn, flags, _, err = unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || (n == 0 && oobn == 0) {
			return 0, false // the other end closed: nothing to run
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > maxHandoff {
			fmt.Fprintln(os.Stderr, "nexd nexlet: hand-off truncated")
			return 1, false
		}
		if oobn > 0 {
			break
		}
		if previews++; previews > 1 {
			fmt.Fprintln(os.Stderr, "nexd nexlet: hand-off: more than one preview")
			return 1, false
		}
		if preview != nil {
			preview(nulSplit(buf[:n]))
		}
	}
	var fds []int
	if cms, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
		for _, cm := range cms {
			if rights, rerr := unix.ParseUnixRights(&cm); rerr == nil {
				fds = append(fds, rights...)
			}
		}
	}
	if len(fds) != 2 && len(fds) != 3 {
		fmt.Fprintf(os.Stderr, "nexd nexlet: hand-off with %d descriptors, want 2 or 3\n", len(fds))
		return 1, false
	}
	// As a fork and exec gives them: not close-on-exec. Descriptor 3 is the local
	// channel, or nothing (its dup3 closes the pair's end).
	targets := []int{1, 2, handoffFD}
	for i, f := range fds {
		if err := unix.Dup3(f, targets[i], 0); err != nil {
			fmt.Fprintf(os.Stderr, "nexd nexlet: hand-off: descriptor %d: %v\n", targets[i], err)
			return 1, false
		}
		unix.Close(f)
	}
	if len(fds) == 2 {
		unix.Close(handoffFD)
	}
	os.Clearenv()
	for k, v := range nulSplit(buf[:n]) {
		os.Setenv(k, v)
	}
	return 0, true
}
