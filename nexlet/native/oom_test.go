package native

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// lowerOwnOOMScore gives the test process (the nexlet here) oom_score_adj -500 as nexd
// gives its nexlets (a write holding CAP_SYS_RESOURCE, which sets the minimum too),
// restored when the test ends. Without that capability (this machine's bounding set
// lacks it) it keeps its own, as a nexlet under such a nexd does. It returns the
// nexlet's value and whether it holds the capability.
func lowerOwnOOMScore(t *testing.T) (own int, capable bool) {
	t.Helper()
	const self = "/proc/self/oom_score_adj"
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	own, err = strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(self, []byte("-500"), 0); err != nil {
		t.Logf("own oom_score_adj stays %d: %v (no CAP_SYS_RESOURCE)", own, err)
		return own, false
	}
	t.Cleanup(func() {
		if err := os.WriteFile(self, b, 0); err != nil {
			t.Errorf("restore own oom_score_adj: %v", err)
		}
	})
	return -500, true
}

// oomScores maps every process running as uid to its oom_score_adj, by its command
// line.
func oomScores(uid uint32) map[string]int {
	out := map[string]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if u, err := procid.UID(pid); err != nil || u != uid {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/oom_score_adj")
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			out[strings.ReplaceAll(string(cmd), "\x00", " ")+"("+e.Name()+")"] = v
		}
	}
	return out
}

// TestWorkloadKeepsNoLowerOOMScore: no process of a workload has a lower oom_score_adj
// than the one its nexlet gives it (0 under a nexlet at -500, 100 above the nexlet's
// where nexd could not lower it), nor can lower its own below it where the nexlet
// holds CAP_SYS_RESOURCE. A forked process inherits its parent's value and its
// minimum. Before, the nexlet raised the workload's after the fork returned, once the
// program ran: here the nexlet is held 300 ms there (as one descheduled under load),
// and what the workload forked at once (sleep 1001, 1002, 1003: three of its five
// processes) kept the nexlet's value, below the workload's; so did a subshell that
// raised its own to look harmless and lowered it again later (sleep 1004), its
// minimum still the nexlet's. Now every process of the workload has the workload's
// value from its birth. The main process and that subshell lowering their own to the
// nexlet's value are refused where the nexlet holds CAP_SYS_RESOURCE (the minimum the
// workload inherits is its value); without it the kernel keeps no minimum above the
// nexlet's and they succeed (logged; README: Security).
// Both isolations: process groups (the fork on the spawner's thread) and cgroup v1
// (on the group's own thread).
func TestWorkloadKeepsNoLowerOOMScore(t *testing.T) {
	needRoot(t)
	t.Run("pgroup", func(t *testing.T) { testWorkloadOOMScore(t, "") })
	t.Run("cgroup", func(t *testing.T) { testWorkloadOOMScore(t, cgroupSpec(t)) })
}

func testWorkloadOOMScore(t *testing.T, cgroupSpec string) {
	own, capable := lowerOwnOOMScore(t)
	want := workloadOOMScore(own)
	uid := testkit.UIDs(t, 1)
	fn := newFakeNode(t)
	cfg := Config{Cgroup: cgroupSpec, Users: UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: t.TempDir()}}
	fn.startNexletHooked(cfg, func(n *Nexlet) {
		n.afterFork = func(string) { time.Sleep(300 * time.Millisecond) }
	})
	low := strconv.Itoa(own)
	body := `sleep 1001 &
sleep 1002 &
(exec sleep 1003) &
(echo ` + strconv.Itoa(want) + ` > /proc/self/oom_score_adj; sleep 0.6; echo ` + low + ` > /proc/self/oom_score_adj; exec sleep 1004) 2>/dev/null &
sleep 0.6
echo ` + low + ` > /proc/$$/oom_score_adj 2>/dev/null
sleep 0.3
echo up
exec sleep 1000`
	fn.mustStart("oomfork", startReq(protocol.LifecycleService, "oomfork", map[string]any{"uri": script(t, body)}, fn.creds()))
	fn.waitLog("oomfork", "stdout", "up")
	s, _ := fn.summary("oomfork")
	if s.Metadata["uid"] != strconv.FormatUint(uint64(uid), 10) {
		t.Fatalf("workload runs as uid %q, not the dynamic uid %d", s.Metadata["uid"], uid)
	}
	// "up" comes before the two that lowered their own value exec their sleeps: read
	// once both have, or a shell still running the script is taken for one that lowered
	// a value the nexlet gave (the shell at the nexlet's value, not yet "sleep 1000").
	scores := oomScores(uid)
	for deadline := time.Now().Add(10 * time.Second); !execed(scores, "sleep 1000", "sleep 1004") && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		scores = oomScores(uid)
	}
	t.Logf("nexlet %d (CAP_SYS_RESOURCE %v), workload given %d: %v", own, capable, want, scores)
	if len(scores) != 5 {
		t.Errorf("found %d processes of the workload, want 5", len(scores))
	}
	lower, selfLowered := 0, 0
	for cmd, v := range scores {
		if v >= want {
			continue
		}
		if strings.HasPrefix(cmd, "sleep 1000") || strings.HasPrefix(cmd, "sleep 1004") {
			selfLowered++
			if !capable && v >= own {
				continue // the kernel's limit without the capability
			}
		}
		lower++
		t.Errorf("%s of the workload has oom_score_adj %d, below its %d", cmd, v, want)
	}
	t.Logf("%d of the workload's %d processes below %d (%d of the two that lowered their own)", lower, len(scores), want, selfLowered)
	if got := ownOOMScore(t); got != own {
		t.Errorf("the nexlet's oom_score_adj is %d after the start, not its %d", got, own)
	}
}

// execed says whether each of cmds is the command line of one of scores' processes.
func execed(scores map[string]int, cmds ...string) bool {
	for _, c := range cmds {
		found := false
		for cmd := range scores {
			if strings.HasPrefix(cmd, c+" ") || strings.HasPrefix(cmd, c+"(") {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func ownOOMScore(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/oom_score_adj")
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestOOMGateConcurrentForks: forks under way at once, on several threads, are all
// born with the workloads' value, and the nexlet has its own again once the last of
// them returned.
func TestOOMGateConcurrentForks(t *testing.T) {
	own := ownOOMScore(t)
	want := workloadOOMScore(own)
	log := slog.New(slog.DiscardHandler)
	var g oomGate
	g.open(log)
	defer g.close()
	var wg sync.WaitGroup
	errs := make(chan error, 8*10)
	for range 8 {
		wg.Go(func() {
			for range 10 {
				v, after := g.enter(log)
				cmd := exec.Command("sleep", "10")
				err := cmd.Start()
				g.leave(log)
				if err != nil {
					errs <- err
					return
				}
				b, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/oom_score_adj")
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				switch {
				case err != nil:
					errs <- err
				case v != want || after:
					errs <- fmt.Errorf("gate gave %d (raise after the fork: %v), want %d", v, after, want)
				case strings.TrimSpace(string(b)) != strconv.Itoa(want):
					errs <- fmt.Errorf("child born with oom_score_adj %s, want %d", strings.TrimSpace(string(b)), want)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := ownOOMScore(t); got != own {
		t.Errorf("own oom_score_adj %d after the forks, want %d", got, own)
	}
}

// BenchmarkOOMGate is the gate's share of a launch (raise own, lower own: two writes
// when no other fork is under way), beside the raise after the fork it replaced (own
// read, the child's written), both on the launch's path.
func BenchmarkOOMGate(b *testing.B) {
	log := slog.New(slog.DiscardHandler)
	b.Run("gate", func(b *testing.B) {
		var g oomGate
		g.open(log)
		defer g.close()
		for b.Loop() {
			g.enter(log)
			g.leave(log)
		}
	})
	b.Run("after", func(b *testing.B) {
		cmd := exec.Command("sleep", "1000")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
		p := "/proc/" + strconv.Itoa(cmd.Process.Pid) + "/oom_score_adj"
		for b.Loop() {
			s, err := os.ReadFile("/proc/self/oom_score_adj")
			if err != nil {
				b.Fatal(err)
			}
			own, _ := strconv.Atoi(strings.TrimSpace(string(s)))
			if err := os.WriteFile(p, []byte(strconv.Itoa(workloadOOMScore(own))), 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}
