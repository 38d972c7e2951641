package cli

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestNoWaitStopRecordedOrNot: `workload stop --no-wait` returns on the node's
// "stopping": exit 0 when the owning nexlet recorded the stop (Nexd-Stop-Recorded) or
// the node says nothing of a record (an upstream-SDK nexlet, an older node); exit 1,
// quoting the node's reason, when the node says the nexlet did not confirm its record
// (Nexd-Stop-Unrecorded): a crash now may undo that stop, and a script must not take it
// for done. Without --no-wait nexctl waits for the answer either way.
func TestNoWaitStopRecordedOrNot(t *testing.T) {
	t.Parallel()
	const id = "aDqYSZ2aIvLTDISr3fAsgI"
	const why = "nexlet local:native (agent A1) did not confirm within 2s that it recorded the stop"
	for _, c := range []struct {
		name     string
		word     nats.Header
		wordOnly bool
		args     []string
		code     int
		want     string
	}{
		{"recorded", nats.Header{protocol.HeaderStopRecorded: {"local:native"}}, true, []string{"--no-wait"}, 0, "is stopping"},
		{"no word on a record", nats.Header{}, true, []string{"--no-wait"}, 0, "is stopping"},
		{"unrecorded", nats.Header{protocol.HeaderStopUnrecorded: {why}}, true, []string{"--no-wait"}, 1, why},
		{"unrecorded, waited for", nats.Header{protocol.HeaderStopUnrecorded: {why}}, false, nil, 0, "successfully stopped"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := testnats.Start(t, testnats.Options{NoJetStream: true})
			a := newFakeNode(t, testnats.Connect(t, s), "NAAA1", nil)
			a.stopOK, a.stopWord, a.wordOnly = true, c.word, c.wordOnly
			a.start()
			args := append([]string{"workload", "stop"}, c.args...)
			out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), append(args, id)...)...)
			if code != c.code || !strings.Contains(out+errOut, c.want) {
				t.Errorf("exit %d, %q %q; want exit %d with %q", code, out, errOut, c.code, c.want)
			}
			if c.code == 1 && !strings.Contains(errOut, "not confirmed recorded") {
				t.Errorf("the error does not say the stop is not confirmed recorded: %q", errOut)
			}
		})
	}
}
