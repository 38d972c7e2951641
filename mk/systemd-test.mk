# make systemd-test: the installed .deb under real systemd (systemd-nspawn) and with
# real cgroup v2 controllers (qemu, TCG), see test/systemd/README.md. Needs root and
# apt install debootstrap systemd-container qemu-system-x86 e2fsprogs zstd gcc
# libc6-dev. Not part of `make test`. The Debian 12 tree is cached in $(NEXD_TESTBED_CACHE).
NEXD_TESTBED_CACHE ?= /var/cache/nexd-testbed
SYSTEMD_TEST_UPGRADE = $(DIST)/systemd-test

.PHONY: systemd-test

# A second package, identical but one version newer, for the upgrade check.
systemd-test: deb
	rm -rf $(SYSTEMD_TEST_UPGRADE) && mkdir -p $(SYSTEMD_TEST_UPGRADE)
	NEXD_PKG_VERSION='$(PKG_VERSION).1' NEXD_PKG_ARCH='$(PKG_ARCH)' NEXD_STAGE='$(PKG_STAGE)' \
		$(NFPM) package --config packaging/nfpm.yaml --packager deb --target $(SYSTEMD_TEST_UPGRADE)/
	# The external NATS server of the fault checks: the nats-server nexd already
	# depends on, built from the module cache.
	$(GO) build -o $(SYSTEMD_TEST_UPGRADE)/nats-server github.com/nats-io/nats-server/v2
	# The qemu suite's workload whose main thread exits alone, its other threads running
	# (a static C program: see the file).
	$(CC) -O2 -static -pthread -o $(SYSTEMD_TEST_UPGRADE)/leaderexit test/systemd/leaderexit.c
	NEXD_TESTBED_CACHE='$(NEXD_TESTBED_CACHE)' NEXD_TESTBED_NATS_SERVER='$(SYSTEMD_TEST_UPGRADE)/nats-server' \
		NEXD_TESTBED_LEADEREXIT='$(SYSTEMD_TEST_UPGRADE)/leaderexit' test/systemd/run.sh \
		$(DIST)/nexd_$(PKG_VERSION)-1_$(PKG_ARCH).deb \
		$(SYSTEMD_TEST_UPGRADE)/nexd_$(PKG_VERSION).1-1_$(PKG_ARCH).deb
