# .deb and .rpm packages with nfpm (github.com/goreleaser/nfpm/v2, run as a tool at a
# pinned version). Uses GO, LDFLAGS and VERSION from the top-level Makefile.
#   make deb rpm          -> dist/nexd_<version>-1_<arch>.deb, dist/nexd-<version>-1.<arch>.rpm
#   make package-lint     -> lintian and rpm -qp checks (needs: apt install lintian rpm)
#   make unit-verify      -> systemd-analyze verify of contrib/systemd/nexd.{service,socket}
NFPM_VERSION ?= v2.45.2
NFPM ?= $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@$(NFPM_VERSION)
DIST ?= dist
PKG_STAGE := $(DIST)/stage
PKG_ARCH ?= $(shell $(GO) env GOARCH)
# Debian and RPM versions must start with a digit and RPM forbids '-': v1.2.3 -> 1.2.3,
# v1.2.3-4-gabc -> 1.2.3+4.gabc, an untagged commit abc1234 -> 0.0.0+gitabc1234.
PKG_VERSION ?= $(shell echo '$(VERSION)' | sed -E 's/^v//; s/-dirty$$//; s/-([0-9]+)-g([0-9a-f]+)$$/+\1.g\2/; /^[0-9]+\.[0-9]+/!s/^/0.0.0+git/; s/-/~/g')
NFPM_ENV = NEXD_PKG_VERSION='$(PKG_VERSION)' NEXD_PKG_ARCH='$(PKG_ARCH)' NEXD_STAGE='$(PKG_STAGE)'

.PHONY: deb rpm packages package-stage package-lint unit-verify

packages: deb rpm

# Static, stripped binaries (no libc dependency to declare; lintian's static-binary tag
# is overridden) and gzipped man pages, as Debian policy wants them.
package-stage:
	rm -rf $(PKG_STAGE) && mkdir -p $(PKG_STAGE)/man/man1 $(PKG_STAGE)/man/man8
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS) -s -w" -o $(PKG_STAGE)/ ./cmd/nexd ./cmd/nexctl
	for f in contrib/man/*.1; do gzip -9n < $$f > $(PKG_STAGE)/man/man1/$$(basename $$f).gz; done
	for f in contrib/man/*.8; do gzip -9n < $$f > $(PKG_STAGE)/man/man8/$$(basename $$f).gz; done

deb: package-stage
	$(NFPM_ENV) $(NFPM) package --config packaging/nfpm.yaml --packager deb --target $(DIST)/

rpm: package-stage
	$(NFPM_ENV) $(NFPM) package --config packaging/nfpm.yaml --packager rpm --target $(DIST)/

# Expected to print nothing but the overrides' "N: ..." notes and rpm's listings.
package-lint:
	lintian --fail-on error,warning --info $(DIST)/nexd_$(PKG_VERSION)-1_$(PKG_ARCH).deb
	rpm -qpi $(DIST)/nexd-$(PKG_VERSION)-1.*.rpm
	rpm -qpl $(DIST)/nexd-$(PKG_VERSION)-1.*.rpm
	rpm -qp --scripts $(DIST)/nexd-$(PKG_VERSION)-1.*.rpm
	rpm -qp --configfiles $(DIST)/nexd-$(PKG_VERSION)-1.*.rpm
	rpm -K $(DIST)/nexd-$(PKG_VERSION)-1.*.rpm

# The unit names /usr/bin/nexd; verify a copy that points at ./$(BIN) instead.
unit-verify: build
	@d=$$(mktemp -d) && sed 's#/usr/bin/#$(CURDIR)/$(BIN)/#' contrib/systemd/nexd.service > $$d/nexd.service && \
		cp contrib/systemd/nexd.socket $$d/ && \
		systemd-analyze verify --man=no $$d/nexd.service $$d/nexd.socket; rc=$$?; rm -rf $$d; exit $$rc
