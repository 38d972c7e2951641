// Package randid makes the ids nexd hands out (workload, agent, bidder and error ids)
// and the tokens that end its reply inboxes: 22 characters of [0-9A-Za-z], shaped like
// a nuid, which upstream Nex uses, but drawn from crypto/rand. A nuid comes from the
// process's one generator (one prefix, a fixed increment), which also names nats.go's
// inboxes, so an id handed to a tenant, a workload or a nexlet, or an inbox a nexlet
// saw, told which inbox the node would use next (daemon/node
// TestAttackWorkloadForgesStartAnswer).
package randid

import "crypto/rand"

const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// Len is the length of an id, a nuid's.
const Len = 22

// New returns a fresh id. crypto/rand does not fail (it aborts the process instead).
func New() string {
	var out [Len]byte
	var buf [32]byte
	used := len(buf)
	for i := 0; i < Len; {
		if used == len(buf) {
			_, _ = rand.Read(buf[:])
			used = 0
		}
		c := buf[used]
		used++
		if c < 248 { // 4*62: every digit equally likely
			out[i] = digits[c%62]
			i++
		}
	}
	return string(out[:])
}
