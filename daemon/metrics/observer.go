package metrics

import "time"

// Observer records the node API's measurements (the metric half of node.Observer; the
// daemon adds WorkloadEnded, which revokes credentials).
type Observer struct{ M *Metrics }

// Auction observes the time one bid took.
func (o Observer) Auction(d time.Duration) { o.M.auctionLatency.Observe(d.Seconds()) }

// Deploy observes one deploy's latency and outcome.
func (o Observer) Deploy(d time.Duration, ok bool) {
	o.M.deployLatency.Observe(d.Seconds())
	if ok {
		o.M.deploys.WithLabelValues("ok").Inc()
	} else {
		o.M.deploys.WithLabelValues("error").Inc()
	}
}

// Stop counts one UNDEPLOY by outcome: "stopped", "not_found", or "already_stopped"
// (a repeat answered from the stop memory; node.StopAlreadyStopped).
func (o Observer) Stop(outcome string) { o.M.stops.WithLabelValues(outcome).Inc() }
