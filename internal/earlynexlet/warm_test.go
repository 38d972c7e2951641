package earlynexlet

import (
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// TestGroupDir: the process's cgroup directory under each kind of mount line, and no
// directory under a read-only mount, another hierarchy's, a mount whose root does not
// hold the group, or a line that is not a cgroup mount.
func TestGroupDir(t *testing.T) {
	cg := []byte("12:pids:/user.slice/u\n4:memory,foo:/nexd/x\n1:name=systemd:/init.scope\n0::/user.slice/u/app.scope\n")
	cases := []struct {
		mount string
		dir   string
	}{
		{"35 25 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory", "/sys/fs/cgroup/memory/nexd/x"},
		{"36 25 0:31 / /sys/fs/cgroup/pids rw,nosuid shared:16 - cgroup cgroup rw,pids", "/sys/fs/cgroup/pids/user.slice/u"},
		{"30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate", "/sys/fs/cgroup/unified/user.slice/u/app.scope"},
		{"30 25 0:26 /user.slice /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw", "/sys/fs/cgroup/u/app.scope"},
		{"35 25 0:30 /nexd/x /mnt/mem rw - cgroup cgroup rw,memory", "/mnt/mem"},
		{"35 25 0:30 /nexd /mnt/mem rw - cgroup cgroup rw,memory", "/mnt/mem/x"},
		{"35 25 0:30 /nex /mnt/mem rw - cgroup cgroup rw,memory", ""},
		{"35 25 0:30 / /sys/fs/cgroup/memory ro,nosuid shared:15 - cgroup cgroup rw,memory", ""},
		{"35 25 0:30 / /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory", ""},
		{"37 25 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu,cpuacct", ""},
		{"22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw", ""},
		{"22 1 8:1 / / rw,relatime", ""},
	}
	for _, c := range cases {
		dir, ok := groupDir([]byte(c.mount), cg)
		if dir != c.dir || ok != (c.dir != "") {
			t.Errorf("groupDir(%q) = %q, %v; want %q", c.mount, dir, ok, c.dir)
		}
	}
}

// TestWarmAttachMovesNothing: a process stays in every group it is in, and so does the
// caller; a pid that does not exist is an error. (cgroup.WarmAttach's test, for this
// package's copy that nexd's package init runs.)
func TestWarmAttachMovesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: cgroup.procs is root's")
	}
	cmd := exec.Command("/bin/sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	where := func(pid string) string {
		b, err := os.ReadFile("/proc/" + pid + "/cgroup")
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	pid := strconv.Itoa(cmd.Process.Pid)
	before, self := where(pid), where("self")
	if err := WarmAttach(cmd.Process.Pid); err != nil {
		t.Fatalf("WarmAttach: %v", err)
	}
	if after := where(pid); after != before {
		t.Fatalf("moved:\n%s\nwas:\n%s", after, before)
	}
	if now := where("self"); now != self {
		t.Fatalf("the test process moved:\n%s\nwas:\n%s", now, self)
	}
	if err := WarmAttach(1 << 30); err == nil {
		t.Fatal("no error for a pid that does not exist")
	}
}
