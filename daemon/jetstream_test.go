package daemon

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/daemon/state"
)

// TestJetStreamStatus: what STATUS shows for the state bucket's health, and that
// Since is when the state last changed, not when it was last asked.
func TestJetStreamStatus(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		h     state.Health
		state string
		want  string
	}{
		{state.Health{Replicas: 3, Current: 3, Leader: "h1"}, "ok", ""},
		{state.Health{Replicas: 3, Current: 2, Leader: "h1", Lost: []string{"h3"}}, "degraded", "2 of 3 replicas current, lost: h3"},
		{state.Health{Replicas: 3, Current: 1}, "unavailable", "no leader"},
		{state.Health{Replicas: 3, Err: errors.New("context deadline exceeded")}, "unavailable", "no JetStream quorum"},
	}
	for _, c := range cases {
		st := jsStatus("nex-N1", c.h, t0)
		if st.State != c.state || !strings.Contains(st.Detail, c.want) {
			t.Errorf("%+v: %s %q, want %s with %q", c.h, st.State, st.Detail, c.state, c.want)
		}
	}
	var w jsWatch
	if w.status() != nil || w.metric() != "" {
		t.Fatal("a fresh watch knows something")
	}
	w.set(jsStatus("b", state.Health{Replicas: 3, Current: 3, Leader: "h1"}, t0))
	w.set(jsStatus("b", state.Health{Replicas: 3, Err: errors.New("timeout")}, t0.Add(5*time.Second)))
	w.set(jsStatus("b", state.Health{Replicas: 3, Err: errors.New("timeout")}, t0.Add(10*time.Second)))
	if st := w.status(); st.State != "unavailable" || !st.Since.Equal(t0.Add(5*time.Second)) || !st.Checked.Equal(t0.Add(10*time.Second)) {
		t.Fatalf("since %v checked %v state %s", st.Since, st.Checked, st.State)
	}
	if w.metric() != "unavailable" {
		t.Fatalf("metric %q", w.metric())
	}
	if err := w.refusal(); err == nil || !strings.Contains(err.Error(), "state store is unavailable") {
		t.Fatalf("unavailable JetStream does not refuse placements: %v", err)
	}
	w.set(jsStatus("b", state.Health{Replicas: 3, Current: 2, Leader: "h1", Lost: []string{"h3"}}, t0.Add(15*time.Second)))
	if err := w.refusal(); err != nil {
		t.Fatalf("degraded (still writable) JetStream refuses placements: %v", err)
	}
}
