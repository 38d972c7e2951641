// Package profdump writes a process's heap and goroutine profiles and its runtime memory
// classes to files while it runs, for measuring nexd and the native nexlet in place
// (`go tool pprof FILE`). It is off unless the environment names a directory:
//
//	NEXD_PROFILE_DIR=/tmp/prof nexd ...
//
// nexd passes the variable on to its native nexlet, with GODEBUG (memprofilerate=N
// samples more finely from the first allocation). Every Interval each process rewrites
// <dir>/<name>-<pid>.heap, .goroutine and .mem. Without the variable, Start turns the
// runtime's heap profiling off.
package profdump

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"time"
)

// EnvDir names the directory profiles go to; unset or empty: no profiles.
const EnvDir = "NEXD_PROFILE_DIR"

// Interval is how often the files are rewritten.
const Interval = 5 * time.Second

// PassOn is what a process that profiles passes on to the processes it starts: EnvDir
// and GODEBUG; nothing when it does not profile.
func PassOn(env func(string) string) map[string]string {
	dir := env(EnvDir)
	if dir == "" {
		return nil
	}
	out := map[string]string{EnvDir: dir}
	if g := env("GODEBUG"); g != "" {
		out["GODEBUG"] = g
	}
	return out
}

// Start writes profiles of this process (named name in the files) until ctx ends; the
// returned wait blocks until the writer has stopped. Without EnvDir it does nothing.
func Start(ctx context.Context, env func(string) string, name string, log *slog.Logger) (wait func()) {
	dir := env(EnvDir)
	if dir == "" {
		// Nobody will read a heap profile: stop sampling for one. Go samples an
		// allocation every 512 KiB into a bucket per distinct stack, kept for the
		// process's life, so a long-running daemon's profile only grows.
		runtime.MemProfileRate = 0
		return func() {}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		log.Warn("profiles not written", "dir", dir, "err", err)
		return func() {}
	}
	base := filepath.Join(dir, name+"-"+strconv.Itoa(os.Getpid()))
	log.Info("writing profiles", "prefix", base, "interval", Interval.String())
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(Interval)
		defer t.Stop()
		for {
			if err := write(base); err != nil {
				log.Warn("profiles not written", "prefix", base, "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	})
	return wg.Wait
}

func write(base string) error {
	for _, p := range []struct {
		ext, profile string
		debug        int
	}{{".heap", "heap", 0}, {".goroutine", "goroutine", 1}} {
		if err := writeFile(base+p.ext, func(f *os.File) error { return pprof.Lookup(p.profile).WriteTo(f, p.debug) }); err != nil {
			return err
		}
	}
	return writeFile(base+".mem", func(f *os.File) error {
		_, err := f.WriteString(MemoryClasses())
		return err
	})
}

func writeFile(path string, fill func(*os.File) error) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if err := fill(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// MemoryClasses is the runtime's /memory/classes/ metrics and goroutine count, one
// "name bytes" line each: where the process's memory is (heap objects, stacks, free
// heap not yet returned, runtime metadata).
func MemoryClasses() string {
	var samples []metrics.Sample
	for _, d := range metrics.All() {
		if strings.HasPrefix(d.Name, "/memory/classes/") || d.Name == "/sched/goroutines:goroutines" ||
			d.Name == "/gc/heap/goal:bytes" || d.Name == "/gc/gogc:percent" || d.Name == "/gc/gomemlimit:bytes" {
			samples = append(samples, metrics.Sample{Name: d.Name})
		}
	}
	metrics.Read(samples)
	var b strings.Builder
	for _, s := range samples {
		if s.Value.Kind() == metrics.KindUint64 {
			fmt.Fprintf(&b, "%s %d\n", s.Name, s.Value.Uint64())
		}
	}
	return b.String()
}
