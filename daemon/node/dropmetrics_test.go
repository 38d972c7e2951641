package node_test

// The attacks on the node's bounds of what one nexlet may cost it, run from here and
// not from package node's tests: after each, its drops are scraped from the metrics
// the daemon serves (daemon/metrics imports this package, so only an external test can
// import it). Before, none of these counts was exported: each test failed on a metric
// absent.

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nexd-project/nexd/daemon/metrics"
	"github.com/nexd-project/nexd/daemon/node"
)

func TestAttackRenewalFloodCostsTheNodeBounded(t *testing.T) {
	wantExported(t, node.AttackRenewalFlood(t), "nexd_nexlet_workload_renewals_dropped_total", (*node.Node).RenewalsDropped)
}

func TestAttackNexletRenewalFloodBounded(t *testing.T) {
	wantExported(t, node.AttackNexletRenewalFlood(t), "nexd_nexlet_user_renewals_dropped_total", (*node.Node).AgentRenewalsDropped)
}

func TestAttackNexletReregistrationFloodBounded(t *testing.T) {
	wantExported(t, node.AttackNexletReregistrationFlood(t), "nexd_nexlet_reregistrations_dropped_total", (*node.Node).ReregistrationsDropped)
}

func TestAttackRogueNexletListMemory(t *testing.T) {
	wantExported(t, node.AttackRogueNexletListMemory(t), "nexd_nexlet_list_answers_refused_total", (*node.Node).ListAnswersRefused)
}

// wantExported registers n's counts in a registry as nexd does, scrapes it over a real
// listener and checks that name is served with the node's own count, above 0. The
// count is read before and after the scrape: a flood's last requests may still be
// handled meanwhile.
func wantExported(t *testing.T, n *node.Node, name string, counted func(*node.Node) uint64) {
	t.Helper()
	count := func() uint64 { return counted(n) }
	m := metrics.New()
	m.WatchNexletBounds(n)
	l, err := m.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := l.Close(ctx); err != nil {
			t.Error(err)
		}
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	before := count()
	resp, err := http.Get("http://" + l.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	after := count()
	if err != nil {
		t.Fatalf("the exposition does not parse: %v", err)
	}
	f := fams[name]
	if f == nil || len(f.GetMetric()) != 1 {
		t.Fatalf("%s not served (%d families served)", name, len(fams))
	}
	got := f.GetMetric()[0].GetCounter().GetValue()
	t.Logf("%s %g (the node counted %d before the scrape, %d after)", name, got, before, after)
	if got < float64(before) || got > float64(after) {
		t.Errorf("%s = %g, the node's own count %d-%d", name, got, before, after)
	}
	if got <= 0 {
		t.Errorf("%s = %g after the attack, want > 0", name, got)
	}
}
