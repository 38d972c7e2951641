package cgroup

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// readDirSubtree is subtreeDirs as it was, with os.ReadDir: the reference.
func readDirSubtree(t testing.TB, dir string) []string {
	out := []string{dir}
	for i := 0; i < len(out); i++ {
		ents, err := os.ReadDir(out[i])
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if e.IsDir() {
				out = append(out, filepath.Join(out[i], e.Name()))
			}
		}
	}
	return out
}

// checkSubtree: got holds what want holds, dir first and every parent before its
// children.
func checkSubtree(t *testing.T, dir string, got, want []string) {
	t.Helper()
	if len(got) == 0 || got[0] != dir {
		t.Fatalf("subtreeDirs(%s) = %v: not %s first", dir, got, dir)
	}
	seen := map[string]bool{}
	for _, d := range got {
		if d != dir && !seen[filepath.Dir(d)] {
			t.Errorf("%s listed before its parent", d)
		}
		seen[d] = true
	}
	if g, w := slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(want)); !slices.Equal(g, w) {
		t.Errorf("subtreeDirs(%s):\n got  %v\n want %v", dir, g, w)
	}
}

// TestSubtreeDirs: the raw listing finds the same directories as os.ReadDir in a tree
// with files, symlinks (to a directory too: not followed, as before), names longer than
// a dirent's fixed part, a directory whose listing needs several reads of the buffer, and
// nesting; a missing root is an error, a subdirectory gone meanwhile is not.
func TestSubtreeDirs(t *testing.T) {
	root := t.TempDir()
	mk := func(p string) {
		if err := os.MkdirAll(filepath.Join(root, p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := func(p string) {
		if err := os.WriteFile(filepath.Join(root, p), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mk("a/b/c")
	mk("a/d")
	mk("e")
	mk(strings.Repeat("long", 60))
	file("cgroup.procs")
	file("a/memory.limit_in_bytes")
	if err := os.Symlink(filepath.Join(root, "a"), filepath.Join(root, "link-to-a")); err != nil {
		t.Fatal(err)
	}
	// 600 entries of ~50 bytes: several 4 KB reads.
	for i := range 300 {
		mk(fmt.Sprintf("many/dir-%03d-%s", i, strings.Repeat("x", 20)))
		file(fmt.Sprintf("many/file-%03d-%s", i, strings.Repeat("y", 20)))
	}
	got, err := subtreeDirs(root)
	if err != nil {
		t.Fatal(err)
	}
	checkSubtree(t, root, got, readDirSubtree(t, root))
	if len(got) != 1+7+300 {
		t.Errorf("%d directories, want %d", len(got), 1+7+300)
	}

	if _, err := subtreeDirs(filepath.Join(root, "missing")); !os.IsNotExist(err) {
		t.Errorf("missing root: err %v, want not-exist", err)
	}
	if _, err := subtreeDirs(filepath.Join(root, "cgroup.procs")); err == nil {
		t.Error("a file as the root: no error")
	}
}

// TestSubtreeDirsRealCgroup compares the two on a tree of groups made for it in this
// host's v1 memory hierarchy (the largest listings) or its cgroup2 one: cgroupfs lists
// its entries with their types. Skipped where neither is writable.
func TestSubtreeDirsRealCgroup(t *testing.T) {
	for _, base := range []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var st unix.Statfs_t
		if unix.Statfs(base, &st) != nil || (st.Type != unix.CGROUP_SUPER_MAGIC && st.Type != unix.CGROUP2_SUPER_MAGIC) || unix.Access(base, unix.W_OK) != nil {
			continue
		}
		root := filepath.Join(base, testkit.OwnedName(t, "nexd-test-subtree-"))
		made := []string{root}
		for _, d := range []string{"a", "a/b", "a/b/c", "d"} {
			made = append(made, filepath.Join(root, d))
		}
		for i, d := range made {
			if err := os.Mkdir(d, 0o755); err != nil {
				if i == 0 {
					t.Skip(err)
				}
				t.Fatal(err)
			}
		}
		t.Cleanup(func() {
			for _, d := range slices.Backward(made) {
				_ = unix.Rmdir(d)
			}
		})
		got, err := subtreeDirs(root)
		if err != nil {
			t.Fatal(err)
		}
		checkSubtree(t, root, got, made)
		return
	}
	t.Skip("no writable cgroup hierarchy")
}

// BenchmarkSubtreeDirs lists a workload's group as a stop does, in a v1 memory
// hierarchy when this host has a writable one (the largest v1 listing), else in a
// directory of the same 30 files; raw against os.ReadDir.
func BenchmarkSubtreeDirs(b *testing.B) {
	dir := ""
	if base := "/sys/fs/cgroup/memory"; unix.Access(base, unix.W_OK) == nil {
		d := filepath.Join(base, fmt.Sprintf("nexd-bench-subtree-%d", rand.Int64()))
		if os.Mkdir(d, 0o755) == nil {
			b.Cleanup(func() { _ = unix.Rmdir(d) })
			dir = d
		}
	}
	if dir == "" {
		dir = b.TempDir()
		for i := range 30 {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("memory.file-%02d", i)), nil, 0o644); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("raw", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := subtreeDirs(dir); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("readdir", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			readDirSubtree(b, dir)
		}
	})
}

// TestReadKey: a key's number from a flat-keyed file (memory.oom_control, memory.events,
// cpu.stat), 0 for a missing key, an error naming the file for a value not a number.
func TestReadKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "memory.oom_control")
	if err := os.WriteFile(p, []byte("oom_kill_disable 0\nunder_oom 0\n  oom_kill 17  \noom_killer 3"), 0o644); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]uint64{"oom_kill": 17, "under_oom": 0, "oom_killer": 3, "missing": 0, "oom": 0} {
		if n, err := readKey(p, key); err != nil || n != want {
			t.Errorf("readKey %s = %d, %v; want %d", key, n, err, want)
		}
	}
	if err := os.WriteFile(p, []byte("oom_kill x1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readKey(p, "oom_kill"); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("not a number: err %v, want one naming %s", err, p)
	}
	if _, err := readKey(p+".missing", "oom_kill"); !os.IsNotExist(err) {
		t.Errorf("missing file: err %v", err)
	}
}

// BenchmarkReadKey reads oom_kill from a memory.oom_control as an exit's OOM check does.
func BenchmarkReadKey(b *testing.B) {
	p := filepath.Join(b.TempDir(), "memory.oom_control")
	if err := os.WriteFile(p, []byte("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := readKey(p, "oom_kill"); err != nil {
			b.Fatal(err)
		}
	}
}

// TestReadPids: the pids of a cgroup.procs, short or longer than the stack buffer (read
// whole), junk skipped; a missing file is not-exist. And on the busiest real list at
// hand (a v1 or v2 root group's, a seq_file that returns whole lines a read) the same
// as os.ReadFile's text, compared until a read of each sees the same processes.
func TestReadPids(t *testing.T) {
	dir := t.TempDir()
	var long []byte
	var want []int
	for i := 1; i <= 1000; i++ {
		long = fmt.Appendf(long, "%d\n", 4000000+i)
		want = append(want, 4000000+i)
	}
	for name, c := range map[string]struct {
		text string
		want []int
	}{
		"empty": {"", nil},
		"short": {"12\n345\n", []int{12, 345}},
		"junk":  {"7\n-1\n0\nx9\n99999999999999999999\n8", []int{7, 8}},
		"long":  {string(long), want},
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(c.text), 0o644); err != nil {
			t.Fatal(err)
		}
		if got, err := readPids(p); err != nil || !slices.Equal(got, c.want) {
			t.Errorf("%s: readPids = %v, %v; want %v", name, got, err, c.want)
		}
	}
	if _, err := readPids(filepath.Join(dir, "missing")); !os.IsNotExist(err) {
		t.Errorf("missing: err %v, want not-exist", err)
	}

	for _, p := range []string{"/sys/fs/cgroup/pids/cgroup.procs", "/sys/fs/cgroup/memory/cgroup.procs", "/sys/fs/cgroup/cgroup.procs"} {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		var got, ref []int
		for range 20 {
			got, _ = readPids(p)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			ref = ref[:0]
			for f := range strings.FieldsSeq(string(b)) {
				var n int
				if _, err := fmt.Sscan(f, &n); err == nil {
					ref = append(ref, n)
				}
			}
			if slices.Equal(got, ref) {
				break
			}
		}
		if !slices.Equal(got, ref) {
			t.Errorf("%s: readPids %d pids, os.ReadFile %d: they never agreed", p, len(got), len(ref))
		}
		t.Logf("%s: %d pids", p, len(got))
		return
	}
}

// BenchmarkReadPids reads a workload group's cgroup.procs of three pids.
func BenchmarkReadPids(b *testing.B) {
	p := filepath.Join(b.TempDir(), "cgroup.procs")
	if err := os.WriteFile(p, []byte("123456\n123460\n123461\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := readPids(p); err != nil {
			b.Fatal(err)
		}
	}
}
