package native

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// watcher is the nexlet's one loop over every workload's output FIFOs and exit pidfds:
// an epoll set of their descriptors, read with one shared buffer. A goroutine, a
// buffer and a netpoller registration per pipe and per process were most of the
// nexlet's memory per workload (three goroutine stacks and two 4 KiB buffers). The
// epoll descriptor itself sits on Go's netpoller, so the loop parks like any goroutine
// and holds no thread.
//
// The loop owns the descriptors it was given: it closes each when its stream ends, its
// process exited, on detach (outputs, adopted processes) or when the watcher stops.
type watcher struct {
	log  *slog.Logger
	line func(*stream, []byte) bool // forwards one output line; false: over the rate
	ep   *os.File                   // the epoll descriptor, on the netpoller
	epfd int                        // ep's descriptor, valid until the loop ends
	wg   sync.WaitGroup             // the loop and the adopted processes' exit handlers

	// rmu is held while a stream is read and its lines forwarded, by the loop (one
	// event at a time) or by readNow; buf is the shared read buffer, under it.
	rmu sync.Mutex
	buf []byte

	mu       sync.Mutex
	watches  map[uint64]*watch // by token (descriptors are reused, tokens never)
	next     uint64
	stopped  bool            // no more adds; the loop closes everything
	detached bool            // outputs and adopted pidfds are let go
	resume   []uint64        // paused streams due again
	flushes  []chan struct{} // flush calls waiting for the loop
	evf      int             // eventfd in the set (token 0): wakes the loop; -1 once closed
}

// watch is one descriptor in the set: an output stream or a pidfd.
type watch struct {
	fd     int
	paused bool // a stream over its output rate, out of the set for outputPause (loop only)

	// output stream
	out *stream

	// a child's pidfd: reap runs in the loop once it exited, with the pidfd still open
	reap func(pidfd int)
	// an adopted process's pidfd: exited runs on a goroutine of its own; let go on
	// detach (the next nexlet watches it)
	exited func()
}

// stream is one workload output stream's state between reads.
type stream struct {
	w     *workload
	name  string    // "stdout" or "stderr"
	feed  io.Writer // made at the first line
	carry []byte    // the start of a line not yet ended
}

// watchBuf is the shared read buffer: a read takes up to one full line.
const watchBuf = pumpMaxLine

func newWatcher(log *slog.Logger, line func(*stream, []byte) bool) (*watcher, error) {
	wt, err := makeWatcher(log, line)
	if err != nil {
		return nil, err
	}
	wt.wg.Go(wt.loop)
	return wt, nil
}

// makeWatcher is newWatcher without its loop (tests read through readNow alone).
func makeWatcher(log *slog.Logger, line func(*stream, []byte) bool) (*watcher, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	evf, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// Token 0 is the eventfd.
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evf, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		unix.Close(evf)
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll_ctl eventfd: %w", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(evf)
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll: %w", err)
	}
	return &watcher{log: log, line: line, ep: os.NewFile(uintptr(epfd), "epoll"), epfd: epfd, evf: evf,
		buf: make([]byte, watchBuf), watches: map[uint64]*watch{}, next: 1}, nil
}

// addOutput watches a workload's output FIFO (a non-blocking read end it then owns),
// and returns its token (for readNow; 0 when it is not watched).
func (wt *watcher) addOutput(w *workload, fd int, name string) (uint64, error) {
	return wt.addTok(&watch{fd: fd, out: &stream{w: w, name: name}})
}

// readNow reads the output streams toks (addOutput's tokens; 0 is skipped) and
// forwards their lines now, on the caller's goroutine: a start calls it right after
// its reply (Nexlet.StartReplied), so that what the workload wrote meanwhile (a
// placement's announcement) follows the reply at once instead of waiting for the loop's
// goroutine, which the Go scheduler runs only once one of the nexlet's Ps polls the
// netpoller (0.4 ms p50, 1.3 ms p75 after the write at load 9). Lines stay in order: a
// stream is read under rmu, by the loop or here.
func (wt *watcher) readNow(toks ...uint64) {
	wt.rmu.Lock()
	defer wt.rmu.Unlock()
	for _, tok := range toks {
		if tok == 0 {
			continue
		}
		wt.mu.Lock()
		x := wt.watches[tok]
		wt.mu.Unlock()
		if x == nil || x.paused || x.out == nil {
			continue // ended, or resting over its output rate
		}
		wt.read(tok, x, wt.buf)
	}
}

// addChild watches a child's pidfd (the watcher then owns it): reap runs in the loop
// once the child has exited, and must not block.
func (wt *watcher) addChild(pidfd int, reap func(pidfd int)) error {
	return wt.add(&watch{fd: pidfd, reap: reap})
}

// addAdopted watches the pidfd of a process that is not the nexlet's child: exited
// runs on a goroutine of its own once it has exited (it may wait for nexd's record of
// the exit). On detach it is let go without exited.
func (wt *watcher) addAdopted(pidfd int, exited func()) error {
	return wt.add(&watch{fd: pidfd, exited: exited})
}

func (wt *watcher) add(x *watch) error {
	_, err := wt.addTok(x)
	return err
}

func (wt *watcher) addTok(x *watch) (uint64, error) {
	wt.mu.Lock()
	defer wt.mu.Unlock()
	if wt.stopped {
		unix.Close(x.fd)
		return 0, errors.New("watcher stopped")
	}
	tok := wt.next
	wt.next++
	if err := unix.EpollCtl(wt.epfd, unix.EPOLL_CTL_ADD, x.fd, event(tok)); err != nil {
		unix.Close(x.fd)
		return 0, fmt.Errorf("epoll_ctl add: %w", err)
	}
	wt.watches[tok] = x
	return tok, nil
}

// detach lets go of every output stream and adopted pidfd (the nexlet is handing its
// workloads to the next one, which opens the FIFOs again): what the workloads write
// meanwhile stays in their pipes; the start of a line already read goes out as it is.
func (wt *watcher) detach() {
	wt.mu.Lock()
	wt.detached = true
	wt.mu.Unlock()
	wt.wake()
}

// flush forwards what every output stream holds now, and returns once it is forwarded:
// the nexlet's shutdown calls it once its workloads are stopped, so that their last
// lines go out before its feed closes.
func (wt *watcher) flush() {
	done := make(chan struct{})
	wt.mu.Lock()
	if wt.stopped {
		wt.mu.Unlock()
		return
	}
	wt.flushes = append(wt.flushes, done)
	wt.mu.Unlock()
	wt.wake()
	<-done
}

// stop ends the loop, closing every descriptor still watched (what an output stream
// holds is forwarded first), and waits for it.
func (wt *watcher) stop() {
	wt.mu.Lock()
	wt.stopped = true
	wt.mu.Unlock()
	wt.wake()
	wt.wg.Wait()
}

func (wt *watcher) wake() {
	wt.mu.Lock()
	defer wt.mu.Unlock()
	if wt.evf >= 0 {
		_, _ = unix.Write(wt.evf, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}
}

func event(tok uint64) *unix.EpollEvent {
	return &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(uint32(tok)), Pad: int32(uint32(tok >> 32))}
}

func token(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

func (wt *watcher) loop() {
	rc, err := wt.ep.SyscallConn()
	if err != nil {
		wt.log.Error("workload watcher not running: no output is forwarded", "err", err)
		wt.rmu.Lock()
		wt.closeAll() // stopped: no flush waits for it
		wt.rmu.Unlock()
		return
	}
	events := make([]unix.EpollEvent, 64)
	for {
		var n int
		var werr error
		err := rc.Read(func(fd uintptr) bool {
			for {
				n, werr = unix.EpollWait(int(fd), events, 0)
				if !errors.Is(werr, unix.EINTR) {
					break
				}
			}
			return n > 0 || werr != nil
		})
		if err == nil {
			err = werr
		}
		if err != nil {
			wt.log.Error("workload watcher failed: no output is forwarded", "err", err)
			wt.rmu.Lock()
			wt.closeAll()
			wt.rmu.Unlock()
			return
		}
		for i := range events[:n] {
			if wt.handle(token(&events[i])) {
				return
			}
		}
	}
}

// handle acts on one ready descriptor of the set; true: stop the loop. Output and
// commands are handled holding rmu (a readNow waits for one event at most); an exit's
// reap is not (a test may hold it, and readNow reads only output).
func (wt *watcher) handle(tok uint64) (stop bool) {
	if tok == 0 {
		var b [8]byte
		_, _ = unix.Read(wt.evf, b[:])
		wt.rmu.Lock()
		defer wt.rmu.Unlock()
		return wt.commands(wt.buf)
	}
	wt.mu.Lock()
	x := wt.watches[tok]
	wt.mu.Unlock()
	switch {
	case x == nil:
		// gone (a readNow may have seen its end)
	case x.out != nil:
		wt.rmu.Lock()
		wt.mu.Lock()
		still := wt.watches[tok] == x // else a readNow saw its end and closed it
		wt.mu.Unlock()
		if still && !x.paused { // paused: resting over its output rate
			wt.read(tok, x, wt.buf)
		}
		wt.rmu.Unlock()
	case x.reap != nil:
		x.reap(x.fd)
		wt.remove(tok, x)
	default:
		wt.remove(tok, x)
		wt.wg.Go(x.exited)
	}
	return false
}

// commands acts on what other goroutines asked for; true: stop the loop.
func (wt *watcher) commands(buf []byte) bool {
	wt.mu.Lock()
	stopped, detached := wt.stopped, wt.detached
	resume, flushes := wt.resume, wt.flushes
	wt.resume, wt.flushes = nil, nil
	outs := map[uint64]*watch{}
	if stopped || len(flushes) > 0 {
		for tok, x := range wt.watches {
			if x.out != nil {
				outs[tok] = x
			}
		}
	}
	wt.mu.Unlock()
	if stopped || len(flushes) > 0 {
		// What the workloads wrote last (a stopped one's final lines) may still be
		// in the pipes, its readiness behind the command's in the epoll set.
		for tok, x := range outs {
			if wt.drain(x, buf, stopped) {
				wt.remove(tok, x)
			}
		}
		for _, done := range flushes {
			close(done)
		}
	}
	if stopped {
		wt.closeAll()
		return true
	}
	for _, tok := range resume {
		wt.mu.Lock()
		x := wt.watches[tok]
		wt.mu.Unlock()
		if x == nil || !x.paused {
			continue
		}
		x.paused = false
		if err := unix.EpollCtl(wt.epfd, unix.EPOLL_CTL_ADD, x.fd, event(tok)); err != nil {
			wt.log.Warn("workload output no longer read", "workload_id", x.out.w.id, "stream", x.out.name, "err", err)
			wt.remove(tok, x)
		}
	}
	if detached {
		wt.mu.Lock()
		var drop []uint64
		for tok, x := range wt.watches {
			if x.out != nil || x.exited != nil {
				drop = append(drop, tok)
			}
		}
		wt.mu.Unlock()
		for _, tok := range drop {
			wt.mu.Lock()
			x := wt.watches[tok]
			wt.mu.Unlock()
			if x.out != nil {
				// The start of a line this nexlet read: the next one reads only the
				// rest, so it goes out now, as it is.
				wt.unfinished(x.out)
			}
			wt.remove(tok, x)
		}
	}
	return false
}

// remove takes x out of the set and closes its descriptor (loop only).
func (wt *watcher) remove(tok uint64, x *watch) {
	wt.mu.Lock()
	delete(wt.watches, tok)
	wt.mu.Unlock()
	if !x.paused {
		_ = unix.EpollCtl(wt.epfd, unix.EPOLL_CTL_DEL, x.fd, nil)
	}
	unix.Close(x.fd)
}

func (wt *watcher) closeAll() {
	wt.mu.Lock()
	wt.stopped = true
	all := wt.watches
	wt.watches = map[uint64]*watch{}
	unix.Close(wt.evf)
	wt.evf = -1
	flushes := wt.flushes
	wt.flushes = nil
	wt.mu.Unlock()
	for _, done := range flushes {
		close(done)
	}
	for _, x := range all {
		unix.Close(x.fd)
	}
	wt.ep.Close()
}

// read takes what one output stream has ready (up to one buffer: every stream gets its
// turn) and forwards its lines.
func (wt *watcher) read(tok uint64, x *watch, buf []byte) {
	s := x.out
	k, err := unix.Read(x.fd, buf)
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
		return
	}
	if k > 0 {
		if wt.forward(s, buf[:k]) {
			// Over its limit: out of the set for a moment, so the pipe fills and a
			// flooding workload blocks on its writes instead of the nexlet spinning
			// to read what it drops.
			_ = unix.EpollCtl(wt.epfd, unix.EPOLL_CTL_DEL, x.fd, nil)
			x.paused = true
			time.AfterFunc(outputPause, func() {
				wt.mu.Lock()
				wt.resume = append(wt.resume, tok)
				wt.mu.Unlock()
				wt.wake()
			})
		}
		return
	}
	// End of stream (every writer gone) or a read error: what is left of a line goes
	// out as it is.
	wt.unfinished(s)
	if err != nil {
		wt.log.Debug("workload output read failed", "workload_id", s.w.id, "stream", s.name, "err", err)
	}
	wt.remove(tok, x)
}

// drain forwards what an output stream has ready now (at most a pipe's worth: the
// workload may still be writing), and what is left of a line, as it is, when the
// stream ended or all is true (the watcher lets go of it). true: the stream ended
// (loop only).
func (wt *watcher) drain(x *watch, buf []byte, all bool) (ended bool) {
	s := x.out
	for range PipeBufferSize/len(buf) + 1 {
		k, err := unix.Read(x.fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if k > 0 {
			wt.forward(s, buf[:k]) // over the rate, lines are dropped (counted) as ever
			continue
		}
		ended = !errors.Is(err, unix.EAGAIN)
		break
	}
	if ended || all {
		wt.unfinished(s)
	}
	return ended
}

// unfinished forwards the start of a line that no later read of this watcher ends,
// as it is.
func (wt *watcher) unfinished(s *stream) {
	if len(s.carry) > 0 {
		wt.line(s, s.carry)
		s.carry = s.carry[:0]
	}
}

// forward sends each line of data (with what an earlier read left unfinished) on; a
// line longer than pumpMaxLine goes out in pieces of that size. It returns true when
// the workload went over its output rate: the complete lines of data not sent yet are
// dropped (counted), and the stream should rest.
func (wt *watcher) forward(s *stream, data []byte) (rest bool) {
	for len(data) > 0 {
		window := data[:min(len(data), pumpMaxLine-len(s.carry))]
		i := bytes.IndexByte(window, '\n')
		if i < 0 && len(s.carry)+len(window) < pumpMaxLine {
			s.carry = append(s.carry, window...)
			break
		}
		end := len(window)
		if i >= 0 {
			end = i + 1
		}
		line := data[:end]
		if len(s.carry) > 0 {
			line = append(s.carry, line...)
		}
		data = data[end:]
		ok := wt.line(s, line)
		s.carry = s.carry[:0]
		if !ok && i >= 0 {
			if j := bytes.LastIndexByte(data, '\n'); j >= 0 {
				s.w.output.drop(bytes.Count(data[:j+1], []byte{'\n'}))
				data = data[j+1:]
			}
			s.carry = append(s.carry, data...)
			return true
		}
	}
	if cap(s.carry) > pumpSmallBuf && len(s.carry) == 0 {
		s.carry = nil // a long line's buffer is not kept for a stream of short ones
	}
	return false
}

// line forwards one line (its "\r\n" trimmed) to the log feed and the nexlet's log,
// within the workload's output limit; false when over it (the line is dropped).
func (n *Nexlet) line(s *stream, line []byte) bool {
	w := s.w
	ok, report := w.output.take(time.Now())
	if report > 0 {
		n.log.Warn("workload output rate-limited", "workload_id", w.id, "namespace", w.ns,
			"dropped", report, "interval", OutputNoteEvery.String(), "limit_per_second", OutputRate)
	}
	if !ok {
		return false
	}
	text := bytes.TrimRight(line, "\r\n")
	if s.feed == nil && n.feed != nil {
		s.feed = n.feed.Logger(w.id, w.ns, s.name)
	}
	if s.feed != nil {
		if _, err := s.feed.Write(text); err != nil {
			n.log.Debug("log line not published", "workload_id", w.id, "err", err)
		}
	}
	n.log.Info("workload output", "workload_id", w.id, "namespace", w.ns, "stream", s.name, "line", string(text))
	return true
}
