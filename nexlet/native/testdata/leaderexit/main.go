// Command leaderexit is a test workload whose main thread exits alone while another
// thread runs on: /proc/<pid>/status then says State Z (zombie) for the process, whose
// other thread still runs as its uid. It prints "ready" before the main thread exits.
// With the argument deaf it ignores SIGTERM.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"
)

func init() { runtime.LockOSThread() } // main runs on the process's first thread

func main() {
	if len(os.Args) > 1 && os.Args[1] == "deaf" {
		signal.Ignore(syscall.SIGTERM)
	}
	ready := make(chan struct{})
	go func() {
		runtime.LockOSThread() // a thread of its own, which stays
		close(ready)
		for {
			time.Sleep(time.Hour)
		}
	}()
	<-ready
	fmt.Fprintln(os.Stdout, "ready")
	// exit(2), not exit_group(2): the first thread ends, the others run on.
	_, _, _ = syscall.RawSyscall(syscall.SYS_EXIT, 0, 0, 0)
}
