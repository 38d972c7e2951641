package supervise

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/cgroup"
)

// The test binary doubles as a scriptable fake nexlet (and a fake nexd), so the tests
// need no external programs: "<test binary> fake-nexlet MODE ARGS...".
func TestMain(m *testing.M) {
	if len(os.Args) > 2 {
		if _, pre := os.LookupEnv(EnvHandoff); pre && os.Args[1] == "fake-nexlet" {
			// Pre-started (Prestart), as nexd's Main does before the native nexlet. A
			// preview shows in the environment after the hand-off as PREVIEW_<key>.
			var preview map[string]string
			code, ok := AwaitHandoff(func(env map[string]string) { preview = env })
			if !ok {
				os.Exit(code)
			}
			for k, v := range preview {
				os.Setenv("PREVIEW_"+k, v)
			}
		}
		switch os.Args[1] {
		case "fake-nexd-prestart":
			os.Exit(fakeNexdPrestart(os.Args[2:]))
		case "fake-nexlet":
			os.Exit(fakeNexlet(os.Args[2], os.Args[3:]))
		case "fake-nexd":
			os.Exit(fakeNexd(os.Args[2:]))
		}
	}
	os.Exit(m.Run())
}

func fakeArgs(mode string, args ...string) []string {
	return append([]string{"fake-nexlet", mode}, args...)
}

// fakeSpec runs the test binary as a nexlet. Under the race detector a Go program sleeps
// a second at exit unless told not to.
func fakeSpec(name, mode string, args ...string) Spec {
	return Spec{Name: name, Path: os.Args[0], Args: fakeArgs(mode, args...),
		Env: map[string]string{"GORACE": "atexit_sleep_ms=0"}}
}

// writeAtomic makes a file appear complete, for a test polling for it.
func writeAtomic(path, content string) {
	if err := os.WriteFile(path+".tmp", []byte(content), 0o644); err != nil {
		panic(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		panic(err)
	}
}

func block() int {
	for {
		time.Sleep(time.Hour)
	}
}

func fakeNexlet(mode string, args []string) int {
	switch mode {
	case "crash-unless": // FILE COUNTFILE: run healthily once FILE exists, else crash after 50 ms
		f, err := os.OpenFile(args[1], os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err == nil {
			fmt.Fprintln(f, os.Getpid())
			f.Close()
		}
		if _, err := os.Stat(args[0]); err == nil {
			fmt.Println("healthy")
			return block()
		}
		time.Sleep(50 * time.Millisecond)
		fmt.Fprintln(os.Stderr, "crashing")
		return 1
	case "block":
		return block()
	case "block-hup": // [READY]: an outliving nexlet: SignalReattach does not end it
		signal.Notify(make(chan os.Signal, 1), SignalReattach)
		if len(args) > 0 { // from now on
			writeAtomic(args[0], "notified")
		}
		return block()
	case "ignore-term": // READY TERMFILE
		c := make(chan os.Signal, 1)
		signal.Notify(c, syscall.SIGTERM)
		writeAtomic(args[0], strconv.Itoa(os.Getpid()))
		<-c
		writeAtomic(args[1], "got SIGTERM")
		return block()
	case "fork-orphan": // PIDFILE: leave a child behind and exit
		c := exec.Command(os.Args[0], "fake-nexlet", "block")
		if err := c.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		writeAtomic(args[0], strconv.Itoa(c.Process.Pid))
		return 0
	case "oom":
		var keep [][]byte
		for range 64 { // up to 2 GiB, touched page by page
			b := make([]byte, 32<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1
			}
			keep = append(keep, b)
		}
		fmt.Println("allocated", len(keep))
		return 0
	case "env": // FILE: dump environment and RLIMIT_NOFILE, then run
		var r syscall.Rlimit
		_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r)
		writeAtomic(args[0], fmt.Sprintf("%s\n--\nnofile=%d/%d\n", strings.Join(os.Environ(), "\n"), r.Cur, r.Max))
		return block()
	case "selfcheck": // FILE RECORD: what it runs with and its pid, first thing, then run
		var b strings.Builder
		for _, f := range []string{"/proc/self/cgroup", "/proc/self/oom_score_adj", args[1]} {
			c, err := os.ReadFile(f)
			fmt.Fprintf(&b, "== %s %v\n%s\n", f, err, c)
		}
		fmt.Fprintf(&b, "== env\n%s\n", strings.Join(os.Environ(), "\n"))
		for fd := 0; fd < 4; fd++ {
			l, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
			fmt.Fprintf(&b, "== fd%d %s\n", fd, l)
		}
		fmt.Fprintf(&b, "== self %d\n", os.Getpid())
		fmt.Println("selfcheck on stdout")
		writeAtomic(args[0], b.String())
		return block()
	case "log": // N GO: classified lines, then (once file GO exists) N numbered lines, then exit
		fmt.Println("hello out")
		fmt.Fprintln(os.Stderr, "plain err")
		fmt.Fprintln(os.Stderr, "<3>bad thing")
		fmt.Println(`{"time":"x","level":"DEBUG","msg":"dbg","k":"v"}`)
		fmt.Println("[ERROR] bracketed")
		fmt.Println(strings.Repeat("x", maxLine+100))
		n, _ := strconv.Atoi(args[0])
		// The test says when the supervisor has logged the classified lines (stdout and
		// stderr are read by separate goroutines), so that the flood cannot use up the
		// rate limiter's burst before stderr's lines come through.
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if _, err := os.Stat(args[1]); err == nil {
				break
			}
		}
		for i := range n {
			fmt.Println("line", i)
		}
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown fake-nexlet mode", mode)
	return 2
}

// fakeNexd supervises one blocking nexlet in the cgroup root given, reports the
// nexlet's pid in READY and runs until killed: "fake-nexd CGROOT READY".
func fakeNexd(args []string) int {
	m, err := cgroup.Detect(args[0], nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	s := New(Options{Cgroups: m.Sub("nexlets")})
	if err := s.Start(context.Background(), fakeSpec("a", "block")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	writeAtomic(args[1], strconv.Itoa(s.Statuses()[0].PID))
	return block()
}

// fakeNexdPrestart pre-starts a blocking fake nexlet, reports its pid and runs until
// killed without ever handing it its start: "fake-nexd-prestart READY MARK" (MARK goes
// into the pre-started process's environment, to find it by).
func fakeNexdPrestart(args []string) int {
	p, err := Prestart(os.Args[0], fakeArgs("block"), map[string]string{"GORACE": "atexit_sleep_ms=0", "NEXD_TEST_MARK": args[1]}, os.Stderr, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	writeAtomic(args[0], strconv.Itoa(p.Pid()))
	return block()
}
