#!/bin/bash
# make systemd-test: boots a cached Debian 12 tree twice, with systemd-nspawn (real
# systemd, no cgroup controllers) and with qemu under TCG (a real kernel with cgroup v2
# controllers), installs the given nexd .deb inside each and runs guest/nspawn.sh and
# guest/qemu.sh there. Afterwards it checks an installation without a running systemd
# (a container without systemd as PID 1, like a chroot).
#
#   test/systemd/run.sh NEXD.deb NEXD-NEWER.deb
#
# Environment: NEXD_TESTBED_CACHE (default /var/cache/nexd-testbed) holds the rootfs
# tarball and the work tree; NEXD_TESTBED_SUITES (default "nspawn qemu") selects suites;
# NEXD_TESTBED_TIMEOUT (default 1800) is each guest's limit in seconds;
# NEXD_TESTBED_NATS_SERVER is a nats-server binary for the nspawn suite's NATS outage
# checks (they fail without it); NEXD_TESTBED_LEADEREXIT is test/systemd/leaderexit.c built
# (static) for the qemu suite's leader-exit checks (they fail without it).
# Needs root. Exit status: 0 when every check passed.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${NEXD_TESTBED_CACHE:-/var/cache/nexd-testbed}
SUITES=${NEXD_TESTBED_SUITES:-nspawn qemu}
W=$CACHE/work
# Each guest's limit. The qemu suite takes 2–4 min under TCG on an idle 2-core host,
# 15 min at a load of 15–20 there; a guest that hangs costs this much of a CI run.
GUEST_TIMEOUT=${NEXD_TESTBED_TIMEOUT:-1800}
T0=$(date +%s)
say() { echo "[systemd-test $(($(date +%s) - T0))s] $*"; }
die() { echo "FAIL: $*"; exit 2; }

[ $# -eq 2 ] || die "usage: $0 NEXD.deb NEXD-NEWER.deb"
DEB=$(realpath -e "$1") && DEB_UP=$(realpath -e "$2") || die "package not found: $1 or $2"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn, mkfs of the VM image)"
for c in debootstrap systemd-nspawn qemu-system-x86_64 mkfs.ext4 zstd; do
	command -v $c >/dev/null || die "$c missing: apt-get install debootstrap systemd-container qemu-system-x86 e2fsprogs zstd"
done

say "rootfs tarball"
TAR=$("$HERE/mkrootfs.sh") || die "building the Debian 12 rootfs failed"

say "extract $TAR"
rm -rf "$W" && mkdir -p "$W/rootfs" "$W/share/out" "$W/share/pkgs" || die "cannot create $W"
tar -C "$W/rootfs" --zstd -xf "$TAR" || die "extracting $TAR failed"
R=$W/rootfs
install -m 0755 "$HERE/guest/ci-run" "$R/usr/local/sbin/ci-run"
install -m 0644 "$HERE/guest/ci-run.service" "$R/etc/systemd/system/ci-run.service"
ln -sf /etc/systemd/system/ci-run.service "$R/etc/systemd/system/multi-user.target.wants/ci-run.service"
cp -r "$HERE/guest" "$W/share/guest"
cp "$DEB" "$W/share/pkgs/nexd.deb" && cp "$DEB_UP" "$W/share/pkgs/nexd-upgrade.deb" || die "copying the packages into $W/share failed"
if [ -n "${NEXD_TESTBED_NATS_SERVER:-}" ]; then
	install -m 0755 "$NEXD_TESTBED_NATS_SERVER" "$W/share/pkgs/nats-server" || die "nats-server $NEXD_TESTBED_NATS_SERVER"
fi
if [ -n "${NEXD_TESTBED_LEADEREXIT:-}" ]; then
	install -m 0755 "$NEXD_TESTBED_LEADEREXIT" "$W/share/pkgs/leaderexit" || die "leaderexit $NEXD_TESTBED_LEADEREXIT"
fi

QEMU_PID=
if [[ " $SUITES " == *" qemu "* ]]; then
	say "VM image"
	cp "$R"/boot/vmlinuz-* "$W/vmlinuz" && cp "$R"/boot/initrd.img-* "$W/initrd.img" &&
		mkfs.ext4 -q -F -d "$R" "$W/vm.img" 3G || die "building the VM image failed"
	say "qemu (TCG) boot + suite, in the background"
	# no_timer_check: the kernel's early check that the IO-APIC timer ticks counts ticks
	# against a busy loop; an emulated CPU on a loaded host fails it and the kernel
	# panics ("IO-APIC + timer doesn't work!", seen with load 14 on 2 cores).
	timeout "$GUEST_TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2048 -smp 2 \
		-nographic -no-reboot -kernel "$W/vmlinuz" -initrd "$W/initrd.img" \
		-append "root=/dev/vda rw console=ttyS0 panic=-1 quiet no_timer_check" \
		-drive file="$W/vm.img",format=raw,if=virtio -nic none \
		-virtfs local,path="$W/share",mount_tag=share,security_model=none \
		</dev/null >"$W/qemu.console" 2>&1 &
	QEMU_PID=$!
fi

NSPAWN_RC=
if [[ " $SUITES " == *" nspawn "* ]]; then
	say "systemd-nspawn boot + suite"
	SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 timeout "$GUEST_TIMEOUT" systemd-nspawn -b -D "$R" --register=no \
		--keep-unit --private-network --console=pipe --bind="$W/share:/mnt" \
		</dev/null >"$W/nspawn.console" 2>&1
	NSPAWN_RC=$?
	say "nspawn exited with $NSPAWN_RC"
	[ "$NSPAWN_RC" = 124 ] && echo "FAIL: the container ran out of its ${GUEST_TIMEOUT}s (NEXD_TESTBED_TIMEOUT); its suite did not finish" >>"$W/share/out/nspawn.log"

	# Maintainer scripts without a running systemd (as in a chroot or image build):
	# install enables the unit but starts nothing; purge cleans up.
	say "install without a running systemd"
	cp "$DEB" "$R/opt/nexd.deb"
	SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$R" --register=no --keep-unit --private-network \
		/bin/sh -c '
			dpkg -i /opt/nexd.deb >/dev/null 2>&1 && echo "PASS: dpkg -i without a running systemd" || echo "FAIL: dpkg -i without a running systemd"
			test -L /etc/systemd/system/multi-user.target.wants/nexd.service && echo "PASS: unit enabled without a running systemd" || echo "FAIL: unit enabled without a running systemd"
			test -L /etc/systemd/system/sockets.target.wants/nexd.socket && echo "PASS: socket unit enabled without a running systemd" || echo "FAIL: socket unit enabled without a running systemd"
			getent group nex >/dev/null && echo "PASS: group nex created without a running systemd" || echo "FAIL: group nex created without a running systemd"
			pgrep -x nexd >/dev/null && echo "FAIL: nothing started without a running systemd" || echo "PASS: nothing started without a running systemd"
			dpkg --purge nexd >/dev/null 2>&1 && ! test -e /var/lib/nex && echo "PASS: dpkg --purge without a running systemd" || echo "FAIL: dpkg --purge without a running systemd"
		' >"$W/share/out/chroot.log" 2>"$W/chroot.stderr"
	echo "$?" >"$W/share/out/chroot.rc"
fi

if [ -n "$QEMU_PID" ]; then
	say "waiting for the VM"
	wait "$QEMU_PID"
	rc=$?
	say "qemu exited with $rc"
	[ "$rc" = 124 ] && echo "FAIL: the VM ran out of its ${GUEST_TIMEOUT}s (NEXD_TESTBED_TIMEOUT); its suite did not finish" >>"$W/share/out/qemu.log"
fi

# nspawn leaves empty cgroups and runtime dirs on the host (testbed.md); remove the
# empty ones only.
for d in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
	rmdir "$d/payload/init.scope" "$d/payload" "$d/supervisor" 2>/dev/null || true
done
rmdir /run/systemd/nspawn/propagate/* /run/systemd/nspawn/propagate /run/systemd/nspawn/locks \
	/run/systemd/nspawn /run/systemd/nspawn-uid 2>/dev/null || true

echo
FAILED=0
for s in $SUITES chroot; do
	[ "$s" = chroot ] && [[ " $SUITES " != *" nspawn "* ]] && continue
	echo "==== $s ===="
	if [ -f "$W/share/out/$s.log" ]; then
		sed "s/^/[$s] /" "$W/share/out/$s.log"
	else
		echo "[$s] FAIL: no results (see $W/$s.console)"
		tail -30 "$W/$s.console" 2>/dev/null
	fi
	rc=$(cat "$W/share/out/$s.rc" 2>/dev/null || echo missing)
	if [ "$rc" != 0 ] || grep -q '^FAIL' "$W/share/out/$s.log" 2>/dev/null; then FAILED=1; fi
done
P=$(cat "$W"/share/out/*.log 2>/dev/null | grep -c '^PASS:')
F=$(cat "$W"/share/out/*.log 2>/dev/null | grep -c '^FAIL:')
say "done: $P passed, $F failed; logs in $W"
if [ "$FAILED" = 0 ] && [ "$F" = 0 ]; then
	# Keep the logs; the 1–2 GB tree and image are only worth keeping after a failure.
	rm -rf "$R" "$W/vm.img"
	echo "systemd-test: PASS"
	exit 0
fi
# Repeat every failed check (with the output lines it printed) last, so a CI log that
# keeps only the tail still names what failed.
echo "---- failed checks ----"
for s in $SUITES chroot; do
	[ -f "$W/share/out/$s.log" ] || { echo "[$s] no results"; continue; }
	awk -v s="$s" '/^FAIL:/ {p = 1; print "[" s "] " $0; next} p && /^      \| / {print "[" s "] " $0; next} {p = 0}' "$W/share/out/$s.log"
	rc=$(cat "$W/share/out/$s.rc" 2>/dev/null || echo missing)
	[ "$rc" = 0 ] || echo "[$s] exit status $rc"
done
echo "systemd-test: FAIL (rootfs, vm.img and logs kept in $W)"
exit 1
