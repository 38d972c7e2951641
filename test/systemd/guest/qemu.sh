#!/bin/bash
# The cgroup suite, run inside a qemu (TCG) VM with a real kernel and cgroup v2
# controllers, against the installed nexd .deb: the delegated subtree layout, nexlet and
# workload limits, and an OOM kill that nexd reports while the service keeps running.
. /mnt/guest/lib.sh
DEB=/mnt/pkgs/nexd.deb
DEB_UP=/mnt/pkgs/nexd-upgrade.deb
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
check "native nexlet runs in nexlets/native" wait_until 30 has_procs "$CG/nexlets/native"
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
check "workload cgroup workloads/<id> holds the process" wait_until 60 has_procs "$WG"
check "workload memory.max = 50M" test "$(cat "$WG/memory.max" 2>/dev/null)" = 52428800
check "workload pids.max = 20" test "$(cat "$WG/pids.max" 2>/dev/null)" = 20

# --- a workload that exceeds its memory limit is OOM-killed and reported ---
HOG=$(run_workload --json --name hog --start-request '{"limits":{"memory_max":"50M"},"restart":{"policy":"never"}}' -- /bin/sh -c 'head -c 300M /dev/zero | tail' | json_field id)
info "workload hog id=$HOG"
check "nexctl workload info reports the OOM kill" \
	wait_until 180 sh -c "nexctl --json workload info $HOG | grep -q 'OOM killer'"
# journald stores nexd's entries and the kernel's messages asynchronously: poll.
check "journal reports the OOM kill with the workload id" \
	wait_until 30 sh -c "journalctl -u nexd -o json --no-pager | grep '\"NEX_WORKLOAD_ID\":\"$HOG\"' | grep -q 'OOM'"
check "kernel OOM kill happened in the workload's memory cgroup" \
	wait_until 30 sh -c "journalctl -k --no-pager | grep -q 'Memory cgroup out of memory'"
check "nexd.service still active, same MainPID (OOMPolicy=continue)" running_with_main "$MAIN"
check "the limited workload lim is unaffected" has_procs "$WG"

# --- kill -9 of the nexlet kills no workload (nexd is their subreaper) ---
WPID=$(cat "$WG/cgroup.procs" | head -1)
NEXLET=$(cat "$CG/nexlets/native/cgroup.procs" | head -1)
kill -9 "$NEXLET"
check "kill -9 of the native nexlet: a new nexlet runs" \
	wait_until 120 sh -c "p=\$(head -1 $CG/nexlets/native/cgroup.procs 2>/dev/null); [ -n \"\$p\" ] && [ \"\$p\" != $NEXLET ]"
check "workload lim keeps its process ($WPID) across the nexlet crash" grep -qx "$WPID" "$WG/cgroup.procs"
adopted_lim() { nexctl --json workloads | grep -q "$ID" && grep -qx "$WPID" "$WG/cgroup.procs"; }
# new_nexlet_up: the new nexlet is the recorded one, nexd lists it running, and it
# listed lim again: the stop below must find it settled, not half registered.
new_nexlet_up() {
	p=$(nexlet_pid) && [ "$p" != "$NEXLET" ] && [ "$(nexlet_count)" = 1 ] &&
		nexctl --json status | tr -d ' \n' | grep -q "\"pid\":$p,\"state\":\"running\"" && adopted_lim && return 0
	nexlet_diag "a new one, not $NEXLET"
	return 1
}
check "the new native nexlet is recorded, running, and lists workload lim" wait_until 120 new_nexlet_up

# --- live_restore (packaged default): stop leaves the workloads and the native nexlet,
# restarts and an upgrade adopt them, lame duck drains ---
NEXLET=$(nexlet_pid)
lim_limit_back() { test "$(cat "$WG/memory.max" 2>/dev/null)" = 52428800; }
adopted_limited() {
	adopted_lim && lim_limit_back && return 0
	echo "lim $ID: $WG/cgroup.procs=[$(tr '\n' ' ' <"$WG/cgroup.procs" 2>&1)] want $WPID; memory.max=$(cat "$WG/memory.max" 2>&1)"
	nexctl --json workloads 2>&1 | tr -d '\n ' | head -c 600; echo
	return 1
}
check "systemctl stop nexd" systemctl stop nexd
check "stop with live_restore left workload lim running ($WPID)" grep -qx "$WPID" "$WG/cgroup.procs"
check "stop with live_restore left the native nexlet running ($NEXLET)" same_nexlet "$NEXLET"
check "systemctl start nexd" systemctl start nexd
check "active (running)" wait_until 120 running
check "workload lim adopted, same process" wait_until 60 adopted_lim
check "the native nexlet adopted, same process ($NEXLET)" same_nexlet "$NEXLET"
check "workload lim's memory.max is back after the adoption (50M)" wait_until 30 lim_limit_back
for i in 1 2; do
	check "systemctl restart nexd ($i)" systemctl restart nexd
	check "active (running) after restart $i" wait_until 120 running
	check "restart $i: workload lim adopted, same process, memory.max 50M" wait_until 60 adopted_limited
	check "restart $i: the native nexlet is the same process ($NEXLET)" same_nexlet "$NEXLET"
done
check "workload lim's /tmp still usable after the restarts" in_tmp "$WPID"
MAIN=$(mainpid)
check "upgrade with apt-get install of the newer .deb" apt-get install -y -q "$DEB_UP"
check "upgrade re-executed nexd in place (same MainPID)" wait_until 120 running_with_main "$MAIN"
new_nexlet() {
	p=$(nexlet_pid) && [ "$p" != "$NEXLET" ] && [ "$(nexlet_count)" = 1 ] && ! readlink "/proc/$p/exe" | grep -q deleted && return 0
	nexlet_diag "a new one, not $NEXLET"
	return 1
}
check "upgrade: the native nexlet handed over to one of the new binary" wait_until 90 new_nexlet
check "upgrade: workload lim adopted, same process, memory.max 50M" wait_until 60 adopted_limited
info "after the upgrade: $(dpkg-query -W nexd), nexlet $(nexlet_pid)"
check "nexctl lameduck --delay 0s" nexctl lameduck --delay 0s
check "lameduck: service exits" wait_until 120 inactive
check "no nexd, nexlet or workload process left" no_node_procs
check "nexd.service cgroup gone" wait_until 30 not test -d "$CG"

# --- deploy cost of each cgroup driver: N deploys one after another ---
# deploy_loop PREFIX N: prints the mean wall time per deploy in ms (nexctl workload run
# with the auction ended at the first bid, so it includes NATS and nexctl's start).
deploy_loop() {
	local t0 i
	t0=$(date +%s%N)
	for i in $(seq "$2"); do run_workload --name "$1$i" -- /bin/sleep 600 >/dev/null || return 1; done
	echo $((($(date +%s%N) - t0) / 1000000 / $2))
}
N=10
check "systemctl start nexd (cgroupfs)" systemctl start nexd
check "active (running)" wait_until 120 running
deploy_loop warm 1 >/dev/null
MS_FS=$(deploy_loop fs $N)
info "deploy cost, cgroup_driver cgroupfs: ${MS_FS} ms per deploy ($N deploys, TCG guest)"
check "cgroupfs: $N deploys ran (${MS_FS} ms each)" test -n "$MS_FS"
check "nexctl lameduck --delay 0s (cgroupfs)" nexctl lameduck --delay 0s
check "lameduck: service exits" wait_until 120 inactive
check "no workload process left" wait_until 60 no_node_procs

# --- cgroup_driver: systemd: each workload in its own transient scope ---
set_config 's/"live_restore": true/"live_restore": true,\n      "cgroup_driver": "systemd"/'
check "config sets cgroup_driver systemd" grep -q '"cgroup_driver": "systemd"' /etc/nex/config.json
check "nexd --check accepts cgroup_driver systemd here" nexd --check
check "systemctl start nexd (systemd driver)" systemctl start nexd
check "active (running)" wait_until 120 running
MAIN=$(mainpid)
check "nexctl status reports the systemd driver" sh -c 'nexctl --json status | tr -d " \n" | grep -q "\"driver\":\"systemd\""'
check "nexctl doctor shows the cgroup driver" sh -c 'nexctl doctor 2>&1 | grep -q "cgroup driver.*systemd"'
ID=$(run_workload --json --name sdlim --start-request '{"limits":{"memory_max":"50M","pids_max":20}}' -- /bin/sleep 600 | json_field id)
info "workload sdlim id=$ID"
U=nex-$ID.scope
SC=/sys/fs/cgroup/nex.slice/nex-workloads.slice/$U
check "scope $U active" wait_until 60 systemctl --quiet is-active "$U"
WPID=$(head -1 "$SC/cgroup.procs" 2>/dev/null)
info "systemctl status $U: $(systemctl status "$U" --no-pager 2>&1 | head -12 | tr '\n' '|')"
check "systemctl status $U shows the workload's process ($WPID)" sh -c "[ -n '$WPID' ] && systemctl status $U --no-pager | grep -q '$WPID.*sleep'"
check "$U: MemoryMax=50M (unit property)" test "$(systemctl show -P MemoryMax "$U")" = 52428800
check "$U: TasksMax=20 (unit property)" test "$(systemctl show -P TasksMax "$U")" = 20
check "$U is in nex-workloads.slice" test "$(systemctl show -P Slice "$U")" = nex-workloads.slice
check "$U: kernel memory.max = 50M" test "$(cat "$SC/memory.max" 2>/dev/null)" = 52428800
CG=/sys/fs/cgroup$(prop ControlGroup)
check "the workload is not in nexd.service's cgroup" not sh -c "cat $CG/cgroup.procs $CG/*/cgroup.procs $CG/*/*/cgroup.procs 2>/dev/null | grep -qx '$WPID'"
check "the holding group workloads/<id> is gone" wait_until 30 not test -d "$CG/workloads/$ID"
check "nexctl workloads reads the scope's memory.max (50M)" sh -c "nexctl --json workloads | tr -d ' \\n' | grep -q 'memory_max.:52428800'"

check "systemctl restart nexd" systemctl restart nexd
check "active (running) after restart" wait_until 120 running_new_main "$MAIN"
check "restart: workload adopted, same process in $U" \
	wait_until 60 sh -c "nexctl --json workloads | grep -q $ID && grep -qx $WPID $SC/cgroup.procs"
MAIN=$(mainpid)
NR=$(nrestarts)
kill -9 "$MAIN"
check "kill -9 of nexd: systemd restarts it (no 219/CGROUP: workloads are outside the unit)" \
	wait_until 120 sh -c "[ \"\$(systemctl show -P MainPID nexd)\" != $MAIN ] && [ \"\$(systemctl show -P NRestarts nexd)\" -gt $NR ] && [ \"\$(systemctl show -P SubState nexd)\" = running ]"
check "no 219/CGROUP in the journal" not sh -c "journalctl -u nexd --no-pager | grep -q 'status=219/CGROUP'"
check "kill -9: workload adopted, same process in $U" \
	wait_until 60 sh -c "nexctl --json workloads | grep -q $ID && grep -qx $WPID $SC/cgroup.procs"
check "kill -9: $U keeps MemoryMax=50M" test "$(systemctl show -P MemoryMax "$U")" = 52428800
check "systemctl stop nexd (live_restore)" systemctl stop nexd
check "stop: workload still runs in $U" grep -qx "$WPID" "$SC/cgroup.procs"
check "systemctl start nexd after the stop" systemctl start nexd
check "active (running)" wait_until 120 running
check "start: workload adopted, same process" \
	wait_until 60 sh -c "nexctl --json workloads | grep -q $ID && grep -qx $WPID $SC/cgroup.procs"

# A nexlet crash: the new nexlet adopts the workload from its scope and sets its limits again.
NEXLET=$(head -1 "$CG/nexlets/native/cgroup.procs" 2>/dev/null)
info "native nexlet pid=$NEXLET"
check "systemd driver: kill -9 of the native nexlet" kill -9 "$NEXLET"
check "systemd driver: a new nexlet runs" \
	wait_until 120 sh -c "p=\$(head -1 $CG/nexlets/native/cgroup.procs 2>/dev/null); [ -n \"\$p\" ] && [ \"\$p\" != $NEXLET ]"
check "nexlet crash: workload adopted from $U, same process, running" \
	wait_until 120 sh -c "nexctl --json workloads | tr -d ' \n' | grep -q '\"id\":\"$ID\"[^}]*\"state\":\"running\"' && grep -qx $WPID $SC/cgroup.procs"
check "nexlet crash: $U keeps MemoryMax=50M" test "$(systemctl show -P MemoryMax "$U")" = 52428800

HOG=$(run_workload --json --name sdhog --start-request '{"limits":{"memory_max":"50M"},"restart":{"policy":"never"}}' -- /bin/sh -c 'head -c 300M /dev/zero | tail' | json_field id)
check "systemd driver: the OOM kill in nex-$HOG.scope is reported" \
	wait_until 180 sh -c "nexctl --json workload info $HOG | grep -q 'OOM killer'"
# --- a workload whose main thread exits alone (exit(2), not exit_group(2)): State Z in
# /proc while its other threads run on, in its scope. It is running, not ended; a stop
# (it ignores SIGTERM) kills its threads after the grace and answers; nothing is left
# in its scope. Twice: the main thread exiting at once, before systemd takes the
# process from its holding group into the scope (there it stays, listed in the
# holding group's cgroup.procs by it alone; the move takes the other threads, and
# the scope's cgroup.procs is empty), and 3 s after the start, in the scope. The
# placement, the listing and the kill look at the process through procid.Stat.Runs
# (0d684fa) and cgroup.Group.Procs, which finds a process by its threads too.
# task_state PID: State of /proc/PID/status; threads PID: its Threads.
task_state() { sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null; }
threads() { sed -n 's/^Threads:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null; }
leader_exited() { [ "$(task_state "$1")" = Z ] && [ "${2:-$(threads "$1")}" -gt 1 ] 2>/dev/null; }
# threads_in PID CGROUP: every thread of PID but its ended main thread is in CGROUP
# (as /proc/PID/task/TID/cgroup says), and there is one at least.
threads_in() {
	local t n=0
	for t in /proc/"$1"/task/*; do
		[ "${t##*/}" = "$1" ] && continue
		n=$((n + 1))
		grep -qx "0::$2" "$t/cgroup" 2>/dev/null || { echo "thread ${t##*/}: $(cat "$t/cgroup" 2>&1)"; return 1; }
	done
	[ "$n" -gt 0 ]
}
# nexlet_lists_running OLD ID: the recorded native nexlet is not OLD, nexd lists it
# running, and it lists workload ID running.
nexlet_lists_running() {
	local p
	p=$(nexlet_pid) && [ "$p" != "$1" ] && nexctl --json status | tr -d ' \n' | grep -q "\"pid\":$p,\"state\":\"running\"" && listed_running "$2"
}
listed_running() { nexctl --json workloads | tr -d ' \n' | grep -q "\"id\":\"$1\"[^}]*\"state\":\"running\""; }
# leader_case NAME DELAY: the checks above for leaderexit DELAY (seconds; empty: at once).
leader_case() {
	local name=$1 lid lpid u sc t0 out nl
	lid=$(run_workload --json --name "$name" --start-request '{"stop_grace":"2s","restart":{"policy":"never"}}' -- /usr/local/bin/leaderexit $2 | json_field id)
	info "workload $name id=$lid (leaderexit $2)"
	u=nex-$lid.scope
	sc=/nex.slice/nex-workloads.slice/$u
	check "$name: scope $u active" wait_until 60 systemctl --quiet is-active "$u"
	wait_until 30 pgrep -x leaderexit >/dev/null
	lpid=$(pgrep -x leaderexit | head -1)
	check "$name: its main thread ($lpid) ended alone: State Z, other threads running" wait_until 60 leader_exited "$lpid"
	info "$name: main thread's cgroup $(cat /proc/"$lpid"/cgroup 2>&1); Threads $(threads "$lpid"); $sc cgroup.procs=[$(tr '\n' ' ' </sys/fs/cgroup"$sc"/cgroup.procs 2>&1)] cgroup.threads=[$(tr '\n' ' ' </sys/fs/cgroup"$sc"/cgroup.threads 2>&1)]"
	check "$name: its running threads are in $u" threads_in "$lpid" "$sc"
	sleep 3 # the nexlet's look at its workloads comes round meanwhile
	check "$name: still listed running 3 s after its main thread ended, not ended" listed_running "$lid"
	check "$name: $u still active" systemctl --quiet is-active "$u"
	check "$name: the holding group workloads/<id> is gone" not test -d "$CG/workloads/$lid"
	# A new nexlet (the old one killed) adopts it from its scope and polls it every
	# 250 ms until its scope lists nothing.
	nl=$(nexlet_pid)
	kill -9 "$nl"
	check "$name: kill -9 of the native nexlet: a new one runs and lists it running" wait_until 120 nexlet_lists_running "$nl" "$lid"
	sleep 3
	check "$name: still listed running 3 s after the new nexlet adopted it, its threads running" \
		sh -c "nexctl --json workloads | tr -d ' \n' | grep -q '\"id\":\"$lid\"[^}]*\"state\":\"running\"' && [ \"\$(sed -n 's/^Threads:[[:space:]]*//p' /proc/$lpid/status)\" -gt 1 ]"
	t0=$(date +%s)
	out=$(timeout 120 nexctl workload stop "$lid" 2>&1)
	check "$name: nexctl workload stop answers" test $? = 0
	info "$name: stop answered in $(($(date +%s) - t0)) s: $(printf '%s' "$out" | tr '\n' '|')"
	check "$name: its threads are gone once the stop answered" wait_until 10 not test -e "/proc/$lpid"
	check "$name: no leaderexit process left" not pgrep -x leaderexit
	check "$name: the stop removes $u" wait_until 60 sh -c "! systemctl --quiet is-active $u && [ -z \"\$(systemctl list-units --all --plain --no-legend $u)\" ]"
	check "$name: no cgroup left of it (scope, holding group)" wait_until 30 sh -c "! test -d /sys/fs/cgroup$sc && ! test -d $CG/workloads/$lid"
	check "$name: the journal says it was killed after its stop grace" \
		wait_until 30 sh -c "journalctl -u nexd -o json --no-pager | grep '\"NEX_WORKLOAD_ID\":\"$lid\"' | grep 'workload stopped' | grep -q 'killed after a stop grace'"
	info "$name: $(journalctl -u nexd -o json --no-pager | grep "\"NEX_WORKLOAD_ID\":\"$lid\"" | grep 'workload stopped' | tail -1 | head -c 600)"
}
if install -m 0755 /mnt/pkgs/leaderexit /usr/local/bin/leaderexit; then
	leader_case sdlead ""
	leader_case sdlead3 3
else
	fail "leaderexit not in /mnt/pkgs (NEXD_TESTBED_LEADEREXIT unset): the leader-exit checks did not run"
fi

check "nexctl workload stop $ID" nexctl workload stop "$ID"
check "stop removes $U" wait_until 60 sh -c "! systemctl --quiet is-active $U && [ -z \"\$(systemctl list-units --all --plain --no-legend $U)\" ]"
# kill -0 also finds a zombie that its parent has not reaped yet: poll.
check "stopped workload's process is gone" wait_until 30 not kill -0 "$WPID"

MS_SD=$(deploy_loop sd $N)
info "deploy cost, cgroup_driver systemd: ${MS_SD} ms per deploy ($N deploys, TCG guest); cgroupfs: ${MS_FS} ms"
check "systemd driver: $N deploys ran (${MS_SD} ms each)" test -n "$MS_SD"
check "$N scopes in nex-workloads.slice" \
	wait_until 30 sh -c "[ \$(systemctl list-units --plain --no-legend --state=active 'nex-*.scope' | wc -l) -ge $N ]"
info "slice: $(systemctl status nex-workloads.slice --no-pager 2>&1 | head -8 | tr '\n' '|')"

check "dpkg --purge nexd" dpkg --purge nexd
check "purge: no nex-*.scope left" wait_until 60 sh -c "[ -z \"\$(systemctl list-units --all --plain --no-legend 'nex-*.scope')\" ]"
check "purge: no nexd, nexlet or workload process left" wait_until 30 no_node_procs
check "purge: no workload cgroup left in nex-workloads.slice" \
	wait_until 30 not sh -c "ls -d /sys/fs/cgroup/nex.slice/nex-workloads.slice/nex-*.scope 2>/dev/null | grep -q ."
check "purge deleted /var/lib/nex" not test -e /var/lib/nex

finish
