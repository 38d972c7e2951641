package native

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/protocol"
)

func TestLameduckKeepsRunningThenStops(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	uri := script(t, `echo up; exec sleep 1000`)
	fn.mustStart("ld1", startReq(protocol.LifecycleService, "ld", map[string]any{"uri": uri, "stop_grace": "2s"}, fn.creds()))
	fn.waitLog("ld1", "stdout", "up")
	r, err := fn.request(protocol.SetLameduckAgentsSubject(testNode), protocol.LameduckRequest{Delay: "1s"}, waitLong)
	if err != nil || r.code != "" {
		t.Fatalf("SETLAMEDUCK: %v %s %s", err, r.code, r.errText)
	}
	var lr protocol.LameduckResponse
	if err := json.Unmarshal(r.data, &lr); err != nil || !lr.Success {
		t.Fatalf("lameduck reply %s", r.data)
	}
	// Still running right after, and new starts are refused.
	if s, ok := fn.summary("ld1"); !ok || s.WorkloadState != protocol.WorkloadRunning {
		t.Errorf("workload not running during the lameduck delay: %+v", s)
	}
	if r := fn.start("ld2", startReq(protocol.LifecycleJob, "ld2", map[string]any{"uri": uri}, fn.creds())); !strings.Contains(r.errText, "lameduck") {
		t.Errorf("start during lameduck: %s %q", r.code, r.errText)
	}
	ping, err := fn.request(protocol.PingAgentSubject(testNode, testAgent), nil, waitLong)
	if err != nil || !strings.Contains(string(ping.data), `"state":"lameduck"`) {
		t.Errorf("ping during lameduck: %v %s", err, ping.data)
	}
	// Then stopped with its grace.
	ev := fn.stoppedEvent("ld1")
	if ev.Error != nil {
		t.Errorf("graceful lameduck stop reported an error: %+v", ev.Error)
	}
	testkit.Eventually(t, "lameduck stop", func() bool { return len(fn.procsOf("ld1")) == 0 })
}

func TestMainRegistersAndStopsWorkloadsOnExit(t *testing.T) {
	fn := newFakeNode(t)
	rt := t.TempDir()
	env := map[string]string{
		nexlet.EnvNatsServers: fn.srv.ClientURL(), nexlet.EnvNodeID: testNode, nexlet.EnvAssignedID: testAgent,
		EnvRuntimeDir: rt, EnvStateDir: t.TempDir(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	go func() { done <- Main(ctx, func(k string) string { return env[k] }, log, nil, nil, nil, nil) }()
	testkit.Eventually(t, "registration", func() bool {
		_, err := fn.request(protocol.PingAgentSubject(testNode, testAgent), nil, 200*time.Millisecond)
		return err == nil
	})
	fn.mustStart("m1", startReq(protocol.LifecycleService, "m1", map[string]any{"uri": script(t, "echo up; exec sleep 1000")}, fn.creds()))
	fn.waitLog("m1", "stdout", "up")
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Main = %v", err)
		}
	case <-time.After(waitLong):
		t.Fatal("Main did not return")
	}
	if p := fn.procsOf("m1"); len(p) != 0 {
		t.Errorf("workload survived the nexlet's exit: %v", p)
	}
	fn.stoppedEvent("m1")

	delete(env, nexlet.EnvNatsServers)
	if err := Main(context.Background(), func(k string) string { return env[k] }, log, nil, nil, nil, nil); err == nil || !strings.Contains(err.Error(), nexlet.EnvNatsServers) {
		t.Errorf("Main without servers = %v", err)
	}
}
