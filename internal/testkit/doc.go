// Package testkit holds the helpers every test package needs, so that each has one
// implementation with one set of bounds: waiting for a condition (Eventually), files
// (WriteFile, PublicDir, CopyFile), a goroutine-safe output buffer (Buffer), real
// unprivileged users and groups for permission tests (NewUser, NewGroup), binaries
// built once per test package (Build), a seccomp filter that plays a kernel or sandbox
// refusing a system call (DenySyscall), and loopback listeners bound to port 0 so no
// test ever picks a "free" port that another process takes before it is used
// (Listen, Addr).
//
// Only tests import it.
package testkit
