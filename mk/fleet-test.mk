# make fleet-test: a fleet of real nexd nodes on this machine, each host a network
# namespace with its own nats-server, and real faults (test/fleet, README "Running a
# fleet"). Needs root, iproute2 and nsenter; not part of `make test`. FLEET_RUN picks
# cases (a go test -run pattern); NEXD_FLEET_* variables set their durations.
# fleet-test-ci is the same cases with shorter faults, as .ci/run runs it.
# fleet-test-scale runs FLEET_NODES nodes (default 100) as processes on one nats-server:
# node list, auctions, placements and lame duck by tag (about 2 minutes, 3 GiB).
FLEET_RUN ?= .
FLEET_CI_RUN ?= NATSServerKilled|Partition|DiskFull|Leaf|DeployUnreachable
FLEET_NODES ?= 100

.PHONY: fleet-test fleet-test-ci fleet-test-scale

fleet-test:
	NEXD_FLEET_TEST=1 $(GO) test -count=1 -v -timeout 25m -run '$(FLEET_RUN)' ./test/fleet

fleet-test-ci:
	NEXD_FLEET_TEST=1 NEXD_FLEET_AFTER=15s NEXD_FLEET_PARTITION=15s NEXD_FLEET_OUTAGE=10s NEXD_FLEET_AUCTIONS=10 \
		$(GO) test -count=1 -v -timeout 15m -run '$(FLEET_CI_RUN)' ./test/fleet

fleet-test-scale:
	NEXD_FLEET_TEST=1 NEXD_FLEET_NODES=$(FLEET_NODES) $(GO) test -count=1 -v -timeout 20m -run 'TestFleetScale$$' ./test/fleet
