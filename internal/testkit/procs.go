package testkit

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Running reports whether process pid exists and has not exited (a zombie has).
func Running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	st := b[i+2] // the state, after ") "
	return st != 'Z' && st != 'X'
}

// KilledOf waits (a second at most: a SIGKILL takes a moment to land) until every one
// of pids has exited, and counts those that have.
func KilledOf(pids ...int) int {
	n := 0
	WaitFor(time.Second, func() bool {
		n = 0
		for _, p := range pids {
			if !Running(p) {
				n++
			}
		}
		return n == len(pids)
	})
	return n
}

// Pidfds counts this process's open pidfds, of any process (one whose process was
// reaped names none).
func Pidfds() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && l == "anon_inode:[pidfd]" {
			n++
		}
	}
	return n
}

// PidfdsOf counts this process's open pidfds that name process pid (/proc/self/fdinfo's
// Pid line).
func PidfdsOf(pid int) int {
	ents, _ := os.ReadDir("/proc/self/fdinfo")
	want := "Pid:\t" + strconv.Itoa(pid) + "\n"
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc/self/fdinfo", e.Name()))
		if err == nil && strings.Contains(string(b), want) {
			n++
		}
	}
	return n
}
