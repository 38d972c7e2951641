package fleet

import (
	"slices"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// startCluster is topology (a): three hosts, one JetStream cluster across them, each
// nexd connected to its own host's server first and the others as fallbacks.
func startCluster(t *testing.T, n int) *Fleet {
	f := NewFleet(t, n)
	f.StartClusterNATS()
	for _, h := range f.Hosts {
		h.StartNexd(h.ClusterURLs())
	}
	h1 := f.Hosts[0]
	testkit.EventuallyWithin(t, 60*time.Second, "every node in node list", func() bool {
		return len(h1.NodeNames(h1.ClusterURLs())) == n
	})
	return f
}

func TestFleetSmoke(t *testing.T) {
	f := startCluster(t, 3)
	h1 := f.Hosts[0]
	names := h1.NodeNames(h1.ClusterURLs())
	slices.Sort(names)
	t.Logf("nodes: %v", names)
	d, err := h1.Deploy(h1.ClusterURLs(), "smoke")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("deployed %+v", d)
}
