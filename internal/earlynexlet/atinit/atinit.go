// Package atinit execs the native nexlet (earlynexlet.Start) from its init, when
// imported by nexd's main package: init runs before main and before the packages that
// import more than this one, so the nexlet's runtime starts about 20 ms earlier than at
// main on a PVM guest (docs/performance-notes.md, Ready). Only cmd/nexd imports it; a test binary that
// linked it would exec itself as a nexlet.
package atinit

import (
	"os"
	"sync/atomic"

	"github.com/nexd-project/nexd/internal/earlynexlet"
)

// early holds what init started until main takes it: written once, before main, and
// emptied by Take. The one package variable an init's result can live in.
var early atomic.Pointer[result]

type result struct {
	p   *earlynexlet.Process
	err error
}

func init() {
	if !earlynexlet.Wanted(os.Args[1:], os.Getenv) {
		return
	}
	path, args, err := earlynexlet.NativeCommand()
	if err == nil {
		var p *earlynexlet.Process
		p, err = earlynexlet.Start(path, args, earlynexlet.RuntimeEnv(os.Getenv))
		if err == nil {
			// Its cgroup warm-up (docs/performance-notes.md, Ready) begins at once: the RCU grace period
			// it waits out passes while nexd's init and build run, so that neither
			// nexd's first cgroup change nor the hand-off's move waits for it.
			p.Warm(earlynexlet.WarmAttach)
			early.Store(&result{p: p})
			return
		}
	}
	early.Store(&result{err: err})
}

// Take returns what init started (nil, nil when it started nothing) and forgets it:
// the caller owns the process from then on.
func Take() (*earlynexlet.Process, error) {
	r := early.Swap(nil)
	if r == nil {
		return nil, nil
	}
	return r.p, r.err
}
