package bench

import (
	"encoding/json"
	"os"
	"syscall"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// A deploy the floor node handles once its stop has begun (its NATS handlers run until
// the connection closes, after stopAll: a request that arrived with the SIGTERM) starts
// nothing: before, its process was started into a map stopAll had already emptied, so
// nothing ended it, and the starter's close waited for it (a day's sleep) until the
// floor node was killed, leaving the workload running.
func TestFloorDeployAfterStopStartsNothing(t *testing.T) {
	ns, err := startNATS(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	nc, err := dial(ns.URL(), "floor-test")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	st, err := newFloorStarter(floorVariant{}, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	f := &floorNode{nc: nc, ns: "system", ws: map[string]*floorProc{}, st: st}
	f.stopAll()
	req, _ := json.Marshal(workloadSpec{Kind: "sh"}.request("system", "late"))
	f.deploy(&nats.Msg{Subject: protocol.DeploySubject("system", floorBidder), Data: req})
	f.mu.Lock()
	left := f.ws
	f.ws = map[string]*floorProc{}
	f.mu.Unlock()
	for id, p := range left {
		t.Errorf("workload %s (pid %d) started after the floor node's stop", id, p.pid)
		_ = syscall.Kill(-p.pid, syscall.SIGKILL)
		<-p.reaped
		<-p.read
	}
	st.close()
}
