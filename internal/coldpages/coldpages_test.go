package coldpages

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const childEnv = "COLDPAGES_TEST_CHILD"

// table is initialised data (a writable mapping of the binary); the child changes it
// at run time, so a drop that discarded its page would bring back the file's values.
var table = [1024]int64{1, 2, 3}

// TestDropInChild runs a copy of the test binary as a real child, removes the copy (as
// an upgrade replaces nexd's binary, so its mappings' path ends in " (deleted)"), and
// has it drop: its resident code and read-only data fall, its writable data keeps what
// it wrote, and it goes on running code and collecting afterwards.
func TestDropInChild(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "coldchild")
	copyFile(t, self, bin)
	cmd := exec.Command(bin, "-test.run=^TestChildHelper$", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outp, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	out := bufio.NewReader(outp)
	expect := func(prefix string) string {
		t.Helper()
		for {
			line, err := out.ReadString('\n')
			if err != nil {
				t.Fatalf("child: waiting for %q: %v", prefix, err)
			}
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				return strings.TrimSpace(rest)
			}
		}
	}
	expect("ready")
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	before := residentOf(t, cmd.Process.Pid, bin)
	fmt.Fprintln(in, "drop")
	var r Result
	if _, err := fmt.Sscan(expect("dropped "), &r.Mappings, &r.Size, &r.Before, &r.After, &r.Kept); err != nil {
		t.Fatal(err)
	}
	waitStopped(t, cmd.Process.Pid)
	after := residentOf(t, cmd.Process.Pid, bin)
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	t.Logf("drop: %+v; resident code %d -> %d KiB, read-only data %d -> %d KiB, writable %d -> %d KiB",
		r, before.exec>>10, after.exec>>10, before.ro>>10, after.ro>>10, before.rw>>10, after.rw>>10)
	if r.Mappings < 2 || r.Kept != 0 {
		t.Errorf("dropped %d mappings, kept %d; want the code and the read-only data, none kept", r.Mappings, r.Kept)
	}
	// Drop's own count, right after the madvise, and the parent's, after the child ran
	// some more code (each fault maps back a page's whole folio and its neighbours).
	// A quarter, not half: the child's other threads (the race detector's, GC) fault
	// pages back between the madvise and the count (49 % gone under CI's load).
	if r.Before < 512<<10 || r.After > r.Before*3/4 {
		t.Errorf("drop: resident %d -> %d bytes, want a quarter gone at least", r.Before, r.After)
	}
	if b, a := before.exec+before.ro, after.exec+after.ro; a > b*3/4 {
		t.Errorf("resident code and read-only data %d -> %d bytes, want a quarter gone at least", b, a)
	}
	if after.rw < before.rw {
		t.Errorf("resident writable data fell %d -> %d bytes: a writable mapping was dropped", before.rw, after.rw)
	}
	fmt.Fprintln(in, "work")
	if got := expect("worked "); got != "ok" {
		t.Errorf("child after the drop: %s", got)
	}
	in.Close()
	if err := cmd.Wait(); err != nil {
		t.Errorf("child: %v", err)
	}
}

// TestChildHelper is the child of TestDropInChild; alone it does nothing.
func TestChildHelper(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		t.Skip("the child of TestDropInChild")
	}
	for i := range table {
		table[i] = int64(i) * 7
	}
	heap := make([]string, 0, 1000)
	for i := range 1000 {
		heap = append(heap, fmt.Sprintf("kept %d", i))
	}
	in := bufio.NewScanner(os.Stdin)
	fmt.Println("ready")
	in.Scan()
	r, err := Drop()
	if err != nil {
		fmt.Println("dropped failed")
		t.Fatal(err)
	}
	// Said with as little code as can be, and then stopped until the parent counted:
	// each fault now maps a page's whole folio back (up to 2 MiB of a binary just
	// written), so the json encoder's reads of type data, or any thread of the child
	// running meanwhile (the collector, a preemption's pclntab lookup), brought back
	// most of the read-only data under -race and load (1724 -> 1596 KiB).
	line := []byte("dropped")
	for _, v := range []uint64{uint64(r.Mappings), r.Size, r.Before, r.After, uint64(r.Kept)} {
		line = strconv.AppendUint(append(line, ' '), v, 10)
	}
	_, _ = os.Stdout.Write(append(line, '\n'))
	_ = syscall.Kill(os.Getpid(), syscall.SIGSTOP)
	in.Scan()
	// Code the start never ran, the collector, and the data written before the drop.
	runtime.GC()
	sum := sha256.Sum256([]byte(strings.Repeat("x", 1<<16)))
	re := regexp.MustCompile(`^kept (\d+)$`)
	slices.Sort(heap)
	problem := ""
	for i, v := range table {
		if v != int64(i)*7 {
			problem = fmt.Sprintf("table[%d] = %d after the drop, want %d", i, v, i*7)
			break
		}
	}
	if problem == "" && (len(heap) != 1000 || !re.MatchString(heap[999]) || sum[0] == sum[1] && sum[1] == sum[2]) {
		problem = fmt.Sprintf("heap or code wrong after the drop: %d %q %x", len(heap), heap[999], sum[:3])
	}
	if problem == "" {
		problem = "ok"
	}
	fmt.Printf("worked %s\n", problem)
}

type resident struct{ exec, ro, rw uint64 }

// waitStopped waits until pid is stopped (its state in /proc/<pid>/stat is T).
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		// pid (comm) state ...: comm may hold spaces and parentheses.
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'T' {
			return
		}
	}
	t.Fatal("the child did not stop after the drop")
}

// residentOf sums the resident bytes of pid's mappings of bin by permission.
func residentOf(t *testing.T, pid int, bin string) resident {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	var r resident
	var cur *uint64
	for line := range strings.Lines(string(b)) {
		first, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
		if !strings.HasSuffix(first, ":") {
			cur = nil
			path := afterFields(rest, 4)
			if path != bin && path != bin+" (deleted)" {
				continue
			}
			switch perms := strings.Fields(rest)[0]; {
			case perms[1] == 'w':
				cur = &r.rw
			case perms[2] == 'x':
				cur = &r.exec
			default:
				cur = &r.ro
			}
			continue
		}
		if first == "Rss:" && cur != nil {
			var kb uint64
			fmt.Sscanf(rest, "%d", &kb)
			*cur += kb << 10
		}
	}
	return r
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestPick: only read-only mappings of the executable with no private page are taken,
// whatever the path's spaces or " (deleted)"; a written read-only mapping (a PIE
// binary's relocated data) is kept and counted, also when its written pages are
// swapped out (Anonymous 0, Swap not).
func TestPick(t *testing.T) {
	exe := "/opt/my nexd (deleted)"
	smaps := `00400000-00800000 r-xp 00000000 08:01 1234 /opt/my nexd (deleted)
Size:               4096 kB
Rss:                2048 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
00800000-00a00000 r--p 00400000 08:01 1234 /opt/my nexd (deleted)
Rss:                1024 kB
Anonymous:             0 kB
00a00000-00a10000 r--p 00600000 08:01 1234 /opt/my nexd (deleted)
Rss:                  64 kB
Anonymous:             4 kB
00a20000-00a30000 r--p 00620000 08:01 1234 /opt/my nexd (deleted)
Rss:                  60 kB
Anonymous:             0 kB
Swap:                  4 kB
00a10000-00a20000 rw-p 00610000 08:01 1234 /opt/my nexd (deleted)
Rss:                  64 kB
Anonymous:             0 kB
00b00000-00b10000 r--p 00000000 08:01 99 /opt/my nexd
Rss:                  64 kB
Anonymous:             0 kB
7f0000000000-7f0000001000 r--p 00000000 00:00 0 
Rss:                   4 kB
Anonymous:             4 kB
`
	got, kept, err := pick(strings.NewReader(smaps), exe)
	if err != nil {
		t.Fatal(err)
	}
	want := []region{{0x400000, 0x800000, 2048 << 10}, {0x800000, 0xa00000, 1024 << 10}}
	if !slices.Equal(got, want) || kept != 2 {
		t.Errorf("pick = %+v, kept %d; want %+v, kept 2", got, kept, want)
	}
}

// BenchmarkRefault: the cost of running code again after a drop, against the same code
// with its pages still mapped. The body (a collection, JSON, SHA-256 and a regexp) is
// some code that start-up did not run hot; "dropped" includes Drop's own two reads of
// smaps and its madvise calls.
func BenchmarkRefault(b *testing.B) {
	body := func() {
		runtime.GC()
		v, _ := json.Marshal(map[string]any{"a": []int{1, 2, 3}, "b": "c"})
		sum := sha256.Sum256(v)
		regexp.MustCompile(`^[a-z]+\d*$`).MatchString(fmt.Sprintf("%x", sum[:4]))
	}
	b.Run("kept", func(b *testing.B) {
		for b.Loop() {
			body()
		}
	})
	b.Run("dropped", func(b *testing.B) {
		for b.Loop() {
			if _, err := Drop(); err != nil {
				b.Fatal(err)
			}
			body()
		}
	})
	b.Run("drop", func(b *testing.B) {
		for b.Loop() {
			if _, err := Drop(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
