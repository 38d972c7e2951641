#!/bin/bash
# The cgroup suite, run inside a qemu (TCG) VM with a real kernel and cgroup v2
# controllers, against the installed nexd .deb: the delegated subtree layout, nexlet and
# workload limits, and an OOM kill that nexd reports while the service keeps running.
. /mnt/guest/lib.sh
DEB=/mnt/pkgs/nexd.deb
export PAGER=cat SYSTEMD_PAGER=cat

info "virt=$(systemd-detect-virt) kernel=$(uname -r) cgroupfs=$(stat -fc %T /sys/fs/cgroup) root controllers=[$(cat /sys/fs/cgroup/cgroup.controllers)]"

check "dpkg -i installs the package" dpkg -i "$DEB"
check "postinst started nexd: active (running)" wait_until 120 running
info "StatusText=$(prop StatusText)"
CG=/sys/fs/cgroup$(prop ControlGroup)
MAIN=$(mainpid)
info "delegated subtree $CG: $(cd "$CG" && find . -mindepth 1 -maxdepth 3 -type d | sort | tr '\n' ' ')"

check "nexctl status reports cgroup v2 enforcing memory" \
	sh -c 'nexctl --json status | tr -d " \n" | grep -q "\"mode\":\"v2\",\"enforced\":\[[^]]*\"memory\""'
check "nexd itself sits in nexd.service/supervisor" grep -qx "$MAIN" "$CG/supervisor/cgroup.procs"
check "controllers enabled for nexd's subtree (memory pids cpu)" \
	sh -c "for c in memory pids cpu; do grep -qw \$c $CG/cgroup.subtree_control || exit 1; done"
check "native nexlet runs in nexlets/native" has_procs "$CG/nexlets/native"
# Defaults: native_limits.memory_max=1G, pids_max=4096, on the nexlet's own group.
nexlet_limit() { cat "$CG/nexlets/native/$1" 2>/dev/null | grep -vx max | head -1; }
check "native nexlet memory.max applied (1G)" test "$(nexlet_limit memory.max)" = 1073741824
check "native nexlet pids.max applied (4096)" test "$(nexlet_limit pids.max)" = 4096
info "nexlets/native: memory.max=$(cat "$CG"/nexlets/native/memory.max) pids.max=$(cat "$CG"/nexlets/native/pids.max)"

# --- a workload with limits sits in its own cgroup with memory.max set ---
ID=$(run_workload --json --name lim --start-request '{"limits":{"memory_max":"50M","pids_max":20}}' -- /bin/sleep 600 | json_field id)
info "workload lim id=$ID"
# Workloads sit beside the nexlets, not below them: a nexlet crash kills none.
WG=$CG/workloads/$ID
check "workload cgroup workloads/<id> holds the process" wait_until 30 has_procs "$WG"
check "workload memory.max = 50M" test "$(cat "$WG/memory.max" 2>/dev/null)" = 52428800
check "workload pids.max = 20" test "$(cat "$WG/pids.max" 2>/dev/null)" = 20

# --- a workload that exceeds its memory limit is OOM-killed and reported ---
HOG=$(run_workload --json --name hog --start-request '{"limits":{"memory_max":"50M"},"restart":{"policy":"never"}}' -- /bin/sh -c 'head -c 300M /dev/zero | tail' | json_field id)
info "workload hog id=$HOG"
check "nexctl workload info reports the OOM kill" \
	wait_until 90 sh -c "nexctl --json workload info $HOG | grep -q 'OOM killer'"
check "journal reports the OOM kill with the workload id" \
	sh -c "journalctl -u nexd -o json --no-pager | grep '\"NEX_WORKLOAD_ID\":\"$HOG\"' | grep -q 'OOM'"
check "kernel OOM kill happened in the workload's memory cgroup" \
	sh -c "journalctl -k --no-pager | grep -q 'Memory cgroup out of memory'"
check "nexd.service still active, same MainPID (OOMPolicy=continue)" running_with_main "$MAIN"
check "the limited workload lim is unaffected" has_procs "$WG"

# --- kill -9 of the nexlet kills no workload (nexd is their subreaper) ---
WPID=$(cat "$WG/cgroup.procs" | head -1)
NEXLET=$(cat "$CG/nexlets/native/cgroup.procs" | head -1)
kill -9 "$NEXLET"
check "kill -9 of the native nexlet: a new nexlet runs" \
	wait_until 60 sh -c "p=\$(head -1 $CG/nexlets/native/cgroup.procs 2>/dev/null); [ -n \"\$p\" ] && [ \"\$p\" != $NEXLET ]"
check "workload lim keeps its process ($WPID) across the nexlet crash" grep -qx "$WPID" "$WG/cgroup.procs"

# --- live_restore (packaged default): stop leaves the workloads, lame duck drains ---
check "systemctl stop nexd" systemctl stop nexd
check "stop with live_restore left workload lim running ($WPID)" grep -qx "$WPID" "$WG/cgroup.procs"
check "systemctl start nexd" systemctl start nexd
check "active (running)" wait_until 120 running
check "workload lim adopted, same process" wait_until 60 sh -c "nexctl --json workloads | grep -q $ID && grep -qx $WPID $WG/cgroup.procs"
check "workload lim's memory.max is back after the adoption (50M)" wait_until 30 sh -c "test \"\$(cat $WG/memory.max 2>/dev/null)\" = 52428800"
check "nexctl lameduck --delay 0s" nexctl lameduck --delay 0s
check "lameduck: service exits" wait_until 120 inactive
check "no nexd, nexlet or workload process left" no_node_procs
check "nexd.service cgroup gone" not test -d "$CG"

finish
