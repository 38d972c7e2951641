// Package daemon is nexd: it loads the configuration, joins NATS (or runs an embedded
// server), serves the node's $NEX API, supervises the nexlets, serves the local control
// socket and speaks the systemd protocol (readiness, status, watchdog, reload, stop).
//
// The sub-packages each own one responsibility; this package is the composition root
// and runs the lifecycle: build (build.go) constructs every component, pushing its
// closer; serve (serve.go) starts them in order, the full control API and metrics
// last; stop drains and unwinds the closers in reverse. Every goroutine is started
// through an owner that stop waits for (owner.go); what the control socket answers
// while the node is built comes from an immutable snapshot (startup.go).
package daemon
