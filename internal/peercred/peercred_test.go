package peercred

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Both ends of a real socket read the other's credentials: here the same process.
func TestOfBothEnds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	for name, c := range map[string]*net.UnixConn{"server": server, "client": client} {
		cred, err := Of(c)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if int(cred.Pid) != os.Getpid() || int(cred.Uid) != os.Getuid() || int(cred.Gid) != os.Getgid() {
			t.Fatalf("%s: cred %+v, want pid %d uid %d gid %d", name, cred, os.Getpid(), os.Getuid(), os.Getgid())
		}
	}
}

// The pid is the process that connected, not the one that accepted: a child (this
// test binary again) that dials is named by its own pid.
func TestOfNamesTheConnectingProcess(t *testing.T) {
	if path := os.Getenv("PEERCRED_DIAL"); path != "" {
		c, err := net.Dial("unix", path)
		if err != nil {
			os.Exit(2)
		}
		_, _ = c.Write([]byte(strconv.Itoa(os.Getpid()) + "\n"))
		_, _ = c.Read(make([]byte, 1)) // until the parent closes
		os.Exit(0)
	}
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestOfNamesTheConnectingProcess$")
	cmd.Env = append(os.Environ(), "PEERCRED_DIAL="+path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Wait() }()
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	said, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	cred, err := Of(c)
	if err != nil {
		t.Fatal(err)
	}
	if int(cred.Pid) != said || int(cred.Pid) != cmd.Process.Pid || int(cred.Pid) == os.Getpid() {
		t.Fatalf("cred pid %d, child says %d, child is %d, we are %d", cred.Pid, said, cmd.Process.Pid, os.Getpid())
	}
}

// A closed connection is an error, not a zero peer that would read as root.
func TestOfClosed(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	f := os.NewFile(uintptr(fds[0]), "pair")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	uc := fc.(*net.UnixConn)
	uc.Close()
	if _, err := Of(uc); err == nil || !strings.Contains(err.Error(), "SO_PEERCRED") {
		t.Fatalf("closed: err %v, want an SO_PEERCRED error", err)
	}
}
