// Package daemon is nexd: it loads the configuration, joins NATS (or runs an embedded
// server), serves the node's $NEX API, supervises the nexlets, serves the local control
// socket and speaks the systemd protocol (readiness, status, watchdog, reload, stop).
//
// The sub-packages each own one responsibility; this package only wires them together
// and runs the lifecycle.
package daemon
