#!/bin/bash
# Builds the cached Debian 12 test tree (systemd PID 1 + a kernel for the qemu VM) once and
# stores it as $CACHE/rootfs.tar.zst. The tree is generic: the harness copies the freshly
# built packages and the guest test scripts in at run time, so this only reruns when the
# package list below changes (the list is part of the cache key).
set -euo pipefail
CACHE=${NEXD_TESTBED_CACHE:-/var/cache/nexd-testbed}
PKGS=systemd,systemd-sysv,dbus,procps,linux-image-amd64,initramfs-tools,util-linux,coreutils
KEY=$(echo "bookworm $PKGS v1" | sha256sum | cut -c1-12)
TAR=$CACHE/rootfs-$KEY.tar.zst
if [ -f "$TAR" ]; then echo "$TAR"; exit 0; fi
mkdir -p "$CACHE"
# The host's own apt source for bookworm main (whichever file and format configures it,
# as apt itself resolves them), and its proxy: a CI machine may only reach its mirror.
MIRROR=${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(SITE) $(RELEASE) $(COMPONENT) $(IDENTIFIER)' 2>/dev/null |
	awk '$2 == "bookworm" && $3 == "main" && $4 == "Packages" {print $1; exit}')}
[ -n "$MIRROR" ] || {
	echo "mkrootfs.sh: no apt source for Debian bookworm main on this host; set DEBIAN_MIRROR=<url>" >&2
	exit 1
}
eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy 2>/dev/null || true)"
if [ -n "${APT_HTTP_PROXY:-}" ] && [ -z "${http_proxy:-}" ]; then export http_proxy=$APT_HTTP_PROXY; fi
TMP=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "debootstrap bookworm ($PKGS) from $MIRROR ..." >&2
debootstrap --variant=minbase --include="$PKGS" bookworm "$TMP/rootfs" "$MIRROR" >"$TMP/debootstrap.log" 2>&1 ||
	{ tail -20 "$TMP/debootstrap.log" >&2; exit 1; }
R=$TMP/rootfs
# A small initrd with just what the virtio VM needs boots about 6 s faster under TCG.
sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\next4\n9p\n9pnet_virtio\n' >>"$R/etc/initramfs-tools/modules"
systemd-nspawn -q -D "$R" --register=no --keep-unit update-initramfs -u >"$TMP/initramfs.log" 2>&1 ||
	{ tail -20 "$TMP/initramfs.log" >&2; exit 1; }
echo "/dev/vda / ext4 rw,relatime 0 1" >"$R/etc/fstab"
echo nexd-testbed >"$R/etc/hostname"
# Empty root password is not needed: the guest runs the suite from a baked unit.
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* || true
tar -C "$R" --zstd -cf "$TAR.tmp" . && mv "$TAR.tmp" "$TAR"
echo "$TAR"
