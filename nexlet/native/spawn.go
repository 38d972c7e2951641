package native

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// spawner starts workload processes from one OS thread that has no_new_privs set.
// Go's SysProcAttr has no no_new_privs field, the flag is per thread and inherited
// through fork and execve, and it can never be cleared: so one locked thread carries
// it and every workload is forked from there. Other nexlet threads stay unaffected.
// The thread lives until the nexlet closes the spawner (workloads carry no Pdeathsig:
// they outlive their nexlet and are adopted by the next one).
type spawner struct {
	reqs chan spawnReq
	done chan struct{}
	err  error // set before ready is closed
}

type spawnReq struct {
	fn  func() error
	out chan error
}

func newSpawner() (*spawner, error) {
	s := &spawner{reqs: make(chan spawnReq), done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(s.done)
		// Never unlocked: the thread ends with this goroutine, taking its flag along.
		runtime.LockOSThread()
		if err := setNoNewPrivs(); err != nil {
			s.err = err
			close(ready)
			return
		}
		close(ready)
		for r := range s.reqs {
			r.out <- r.fn()
		}
	}()
	<-ready
	if s.err != nil {
		<-s.done
		return nil, s.err
	}
	return s, nil
}

// run calls fn (which forks) on the no_new_privs thread.
func (s *spawner) run(fn func() error) error {
	out := make(chan error, 1)
	s.reqs <- spawnReq{fn: fn, out: out}
	return <-out
}

// close ends the thread; workloads keep running.
func (s *spawner) close() {
	close(s.reqs)
	<-s.done
}

// setNoNewPrivs sets no_new_privs on the calling OS thread (locked by the caller).
func setNoNewPrivs() error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	return nil
}
