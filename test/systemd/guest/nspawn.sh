#!/bin/bash
# The systemd suite, run inside a booted Debian 12 systemd-nspawn container against the
# installed nexd .deb: install, start, notify/STATUS, socket access, reload, watchdog,
# journal fields, workloads, restart and state, hung-node restart, stop, lameduck,
# upgrade, remove and purge. cgroup controllers are unavailable here (see qemu.sh).
. /mnt/guest/lib.sh
DEB=/mnt/pkgs/nexd.deb
DEB_UP=/mnt/pkgs/nexd-upgrade.deb
export PAGER=cat SYSTEMD_PAGER=cat

info "virt=$(systemd-detect-virt) cgroupfs=$(stat -fc %T /sys/fs/cgroup) $(systemctl --version | head -1)"

# --- package installation (postinst: sysusers, tmpfiles, enable, start) ---
check "dpkg -i installs the package" dpkg -i "$DEB"
check "sysusers created group nex" getent group nex
check "tmpfiles: /var/lib/nex is 0700" test "$(stat -c %a /var/lib/nex)" = 700
check "/etc/nex/config.json is 0640 root:nex" test "$(stat -c '%a %U:%G' /etc/nex/config.json)" = "640 root:nex"
check "nexd.service enabled on first install" systemctl --quiet is-enabled nexd.service
check "nexd.socket enabled on first install" systemctl --quiet is-enabled nexd.socket
check "systemd-analyze verify nexd.service nexd.socket is clean" \
	sh -c 'out=$(systemd-analyze verify --man=no /usr/lib/systemd/system/nexd.service /usr/lib/systemd/system/nexd.socket 2>&1); echo "$out"; [ -z "$out" ]'
SCORE=$(systemd-analyze security nexd.service --no-pager 2>&1 | tail -1)
info "security: $SCORE"
check "systemd-analyze security: exposure below the 6.4 of before issue 12" \
	sh -c "echo '$SCORE' | grep -o 'level for nexd.service: [0-9.]*' | awk '{ exit !(\$NF < 6.4) }'"

# --- start: Type=notify READY with a STATUS line ---
check "postinst started nexd: active (running)" wait_until 90 running
T_ACTIVE=$(date +%s)
check "Type=notify with a STATUS line (systemctl status shows Status:)" \
	sh -c 'systemctl status nexd --no-pager | grep -q "Status: \""'
info "StatusText=$(prop StatusText)"

# --- socket activation: systemd owns the control socket, nexd serves it ---
check "nexd.socket listens on /run/nex/nexd.sock" \
	sh -c 'systemctl --quiet is-active nexd.socket && systemctl show -P Listen nexd.socket | grep -qx "/run/nex/nexd.sock (Stream)"'
# journald stores nexd's entries asynchronously: journal checks poll.
check "nexd serves the socket it got from nexd.socket (SOCKET_ACTIVATED=true in the journal)" \
	wait_until 30 sh -c "journalctl -u nexd -o json --no-pager | grep -q '\"SOCKET_ACTIVATED\":\"true\"'"
check "nexd applied control_allow_others=status to systemd's socket (0666 root:nex)" \
	test "$(stat -c '%a %U:%G' /run/nex/nexd.sock)" = "666 root:nex"
NODE=$(node_id)
info "node id $NODE"

# --- control socket access ---
useradd -m -G nex alice
useradd -m bob
check "nexctl status as root" nexctl status
check "nexctl status as a member of group nex" runuser -u alice -- nexctl status
check "nexctl config (full access) as a member of group nex" runuser -u alice -- nexctl config
check "nexctl status as another user (control_allow_others=status)" runuser -u bob -- nexctl status
check "nexctl config refused for another user" not runuser -u bob -- nexctl config
info "socket: $(stat -c '%A %U:%G %n' /run/nex/nexd.sock)"

# --- journal fields ---
check "journal carries NEX_NODE_ID" \
	wait_until 30 sh -c "journalctl -u nexd -o json --no-pager | grep -q '\"NEX_NODE_ID\":\"$NODE\"'"

# --- a workload ---
check "nexctl workload run --name x -- /bin/sleep 600" run_workload --name x -- /bin/sleep 600
check "workload x runs" wait_until 30 running_once x sleep
WPID=$(pgrep -x sleep | head -1)
check "workload process is in nexd.service's cgroup" grep -q 'nexd.service' "/proc/$WPID/cgroup"
check "workload runs under a dynamic uid (61184-65519)" \
	sh -c "u=\$(stat -c %u /proc/$WPID); [ \$u -ge 61184 ] && [ \$u -le 65519 ]"
check "workload has no_new_privs and no capabilities" \
	sh -c "grep -q '^NoNewPrivs:[[:space:]]*1' /proc/$WPID/status && grep -q '^CapEff:[[:space:]]*0*\$' /proc/$WPID/status"
check "the workload cannot read /etc/nex/config.json or the state dir" \
	sh -c "u=\$(stat -c %u /proc/$WPID); ! setpriv --reuid \$u --regid \$u --clear-groups cat /etc/nex/config.json && ! setpriv --reuid \$u --regid \$u --clear-groups ls /var/lib/nex"
check "the embedded NATS refuses a client without credentials (another user)" \
	not runuser -u bob -- nexctl --nats.servers nats://127.0.0.1:4222 --nats.timeout 5s workload run --lifecycle job -- /usr/bin/id
check "a member of nex needs no NATS set-up (credential from the control socket)" runuser -u alice -- nexctl workload list
info "workload cgroup: $(cat /proc/"$WPID"/cgroup 2>/dev/null | tr '\n' ' ')"
check "journal carries the workload fields (NEX_WORKLOAD_ID, NEX_NAMESPACE)" \
	wait_until 30 sh -c "journalctl -u nexd -o json --no-pager | grep '\"NEX_WORKLOAD_ID\"' | grep -q '\"NEX_NAMESPACE\":\"system\"'"
# A job whose output the history checks below read back from the journal (log_stream is
# off in the packaged config) after the restarts have emptied the node's log buffer.
HIST=$(run_workload --json --name hist --lifecycle job -- /bin/sh -c 'for i in 1 2 3 4 5; do echo hist-line-$i; done' | json_field id)
check "job hist ran (id $HIST)" test -n "$HIST"
check "job hist's output is in the journal (NEX_WORKLOAD_ID, LINE)" \
	wait_until 30 sh -c "journalctl -o json --no-pager NEX_WORKLOAD_ID=$HIST | grep -q '\"LINE\":\"hist-line-5\"'"

# --- reload: good config changes the log level; bad config is rejected ---
MAIN=$(mainpid)
cp /etc/nex/config.json /root/config.orig
set_config 's/"level": "info"/"level": "debug"/'
check "systemctl reload with a good config succeeds" systemctl reload nexd
check "reload changed the log level to debug" log_level_is debug
cp /etc/nex/config.json /root/config.good
set_config 's/"level": "debug"/"level": "loud"/'
check "systemctl reload with a bad config fails" not systemctl reload nexd
check "node keeps running after the bad reload (same MainPID)" running_with_main "$MAIN"
check "old config still in force after the bad reload" log_level_is debug
info "StatusText after bad reload: $(prop StatusText)"
cp /root/config.good /etc/nex/config.json
check "reload after restoring the config succeeds" systemctl reload nexd

# --- watchdog keeps it alive past WatchdogSec=30s ---
check "WatchdogSec is 30s" test "$(prop WatchdogUSec)" = 30s
# Counted from T_ACTIVE, taken after nexd was seen active: at least 36 s of activity.
while [ "$(date +%s)" -lt $((T_ACTIVE + 36)) ]; do sleep 1; done
check "watchdog: still running 36s after start (WatchdogSec=30s), same MainPID, NRestarts=0" watchdog_ok "$MAIN"

# --- restart keeps the node id and the workload's very process (live_restore) ---
WPID=$(pgrep -x sleep | head -1)
# The native nexlet outlives nexd too: every nexd below adopts it (same pid).
NEXLET=$(nexlet_pid)
check "the native nexlet is recorded in $NEXLET_RECORD and runs (pid ${NEXLET:-none})" test -n "$NEXLET"
# Also an admin edit that the upgrade below must keep: others lose status access.
set_config 's/"control_allow_others": "status"/"control_allow_others": "none"/'
# nexctl calls made while nexd restarts wait on nexd.socket's socket for the next nexd.
rm -f /root/restarted
# A failed call is logged with its time and nexctl's error text (one line), which the
# check below prints.
(while [ ! -e /root/restarted ]; do if out=$(nexctl status 2>&1); then echo ok; else echo "FAIL $(date +%T.%N): $(printf '%s' "$out" | tr '\n' ' ')"; fi; done) >/root/during-restart.log 2>&1 &
LOOP=$!
check "systemctl restart nexd" systemctl restart nexd
touch /root/restarted
wait "$LOOP"
check "no nexctl status failed during the restart ($(grep -cx ok /root/during-restart.log) calls)" \
	not grep FAIL /root/during-restart.log
check "active (running) after restart" wait_until 90 running
# Started at level debug (config.good): its unmapping of the binary's start-up pages
# after READY (coldpages) logs what it did, and would warn if the unit's sandbox refused it.
check "nexd dropped its start-up pages under the unit's sandbox (journal, debug)" \
	wait_until 30 sh -c "journalctl -u nexd -o cat --no-pager | grep -q 'start-up pages dropped'"
check "no 'start-up pages not dropped' warning in the journal" \
	not sh -c "journalctl -u nexd -o cat --no-pager | grep -q 'start-up pages not dropped'"
check "socket mode 0660 after restart with control_allow_others=none" test "$(stat -c %a /run/nex/nexd.sock)" = 660
check "node id kept across restart (state dir)" test "$(node_id)" = "$NODE"
check "workload x back exactly once after restart" wait_until 60 running_once x sleep
check "workload x kept its process across the restart ($WPID)" test "$(pgrep -x sleep)" = "$WPID"
check "the native nexlet adopted across the restart, not started again ($NEXLET)" same_nexlet "$NEXLET"
for i in 2 3 4 5; do
	check "systemctl restart nexd ($i of 5)" systemctl restart nexd
	check "active (running) after restart $i" wait_until 90 running
	check "workload x listed and the same process after restart $i" wait_until 60 same_sleep x "$WPID"
	check "the native nexlet is the same process after restart $i ($NEXLET)" same_nexlet "$NEXLET"
done
check "workload x's /tmp still usable after five restarts" in_tmp "$WPID"
check "nexctl status refused for another user with control_allow_others=none" not runuser -u bob -- nexctl status

# --- workload history from the journal (nexd restarted since: its log buffer is new) ---
check "log_stream is off (history cannot come from NEX_LOGS)" \
	sh -c "nexctl --json config | tr -d ' \n' | grep -q '\"log_stream\":{\"value\":false'"
# bob (a local user outside nex) forges an output line of $HIST: any sender may set
# NEX_WORKLOAD_ID, MESSAGE and LINE; only journald's _UID (nexd's) makes it output.
runuser -u bob -- sh -c "printf 'MESSAGE=workload output\nNEX_WORKLOAD_ID=$HIST\nLINE=forged-by-bob\nNEXLET_STREAM=stdout\n' | logger --journald"
check "bob's forged line for $HIST is in the journal (the forgery reaches it)" \
	wait_until 30 sh -c "journalctl -o json --no-pager NEX_WORKLOAD_ID=$HIST | grep -q forged-by-bob"
check "bob's forged line is not $HIST's output (nexctl as root, and alice through the node)" \
	sh -c "! nexctl workload logs $HIST --tail 5 | grep -q forged && ! runuser -u alice -- nexctl workload logs $HIST --tail 5 | grep -q forged"
check "nexctl workload logs $HIST --tail 2: the job's last two lines, from the journal" \
	logs_are "$HIST" "$(printf 'hist-line-4\nhist-line-5')" --tail 2
check "nexctl workload logs $HIST --since 1h: all five lines" \
	logs_are "$HIST" "$(printf 'hist-line-%s\n' 1 2 3 4 5 | head -c -1)" --since 1h
check "nexctl workload logs $HIST --since 1h --tail 1: the last line" logs_are "$HIST" hist-line-5 --since 1h --tail 1
check "as alice (group nex, no journal access): workload logs $HIST --tail 2 through the node, which reads the journal" \
	runuser -u alice -- sh -c "out=\$(nexctl workload logs $HIST --tail 2); echo \"\$out\"; [ \"\$out\" = \"\$(printf 'hist-line-4\\nhist-line-5')\" ]"
info "as alice, journalctl itself: $(runuser -u alice -- journalctl -q -o cat NEX_WORKLOAD_ID=$HIST 2>&1 | head -2 | tr '\n' '|')"
check "nexctl workload logs $HIST --since 1s (nothing since): empty, says the journal has none since then" \
	sh -c "out=\$(nexctl workload logs $HIST --since 1s 2>&1 >/dev/null); echo \"\$out\"; [ -z \"\$(nexctl workload logs $HIST --since 1s 2>/dev/null)\" ] && echo \"\$out\" | grep -q 'in the journal since'"
check "nexctl status still works for a member of group nex" runuser -u alice -- nexctl status

# --- a hung node (SIGSTOP) is killed by the watchdog and restarted ---
MAIN=$(mainpid)
kill -STOP "$MAIN"
check "hung node restarted by systemd (watchdog timeout)" wait_until 150 restarted_by_watchdog "$MAIN"
check "journal shows the watchdog timeout" wait_until 30 sh -c 'journalctl -u nexd --no-pager | grep -qi "watchdog timeout"'
check "workload x back exactly once after the watchdog restart" wait_until 60 running_once x sleep
check "workload x kept its process across the watchdog abort ($WPID)" test "$(pgrep -x sleep)" = "$WPID"
check "the native nexlet adopted after the watchdog abort ($NEXLET)" wait_until 30 same_nexlet "$NEXLET"

# --- a job that ends while nexd is stopped: its exit code reaches the next nexd, and it
# never runs twice. It blocks on a lock this shell holds (no sleep process, which the
# checks above count), then exits 7.
: >/dev/shm/nex-gate && chmod 0644 /dev/shm/nex-gate
: >/dev/shm/nex-jobruns && chmod 0666 /dev/shm/nex-jobruns
exec 9>/dev/shm/nex-gate
flock 9
JOB=$(run_workload --json --name j7 --lifecycle job -- /bin/sh -c 'echo ran >> /dev/shm/nex-jobruns; flock -s /dev/shm/nex-gate true; exit 7' | json_field id)
info "job j7 id=$JOB"
check "job j7 runs (blocked on the gate)" wait_until 30 sh -c "pgrep -f '[f]lock -s /dev/shm/nex-gate' && nexctl --json workloads | grep -q $JOB"

# --- stop with live_restore (packaged default) leaves the workload for the next nexd ---
check "systemctl stop nexd" systemctl stop nexd
check "stopped cleanly (Result=success, exit status 0)" stopped_cleanly
check "no nexd main process left" sh -c "! pgrep -f '^/usr/bin/nexd\$'"
check "live_restore: workload x still runs with nexd stopped ($WPID)" test "$(pgrep -x sleep)" = "$WPID"
check "live_restore: the native nexlet still runs with nexd stopped ($NEXLET)" same_nexlet "$NEXLET"
flock -u 9
exec 9>&-
check "job j7 ended while nexd was stopped" wait_until 30 sh -c "! pgrep -f '[f]lock -s /dev/shm/nex-gate'"
check "nexd.socket still listens with nexd stopped" systemctl --quiet is-active nexd.socket
check "nexctl status with nexd stopped: nexd.socket starts nexd and the call is answered" nexctl status
check "active (running) again, started through the socket" wait_until 90 running
check "workload x adopted again, the same process" wait_until 60 same_sleep x "$WPID"
check "the native nexlet adopted again, the same process ($NEXLET)" same_nexlet "$NEXLET"
left_state() { # left_state ID: the workload is not in the node's state
	local out
	out=$(nexctl node state "$NODE" 2>&1) || { echo "nexctl node state: $out"; return 1; }
	! printf '%s\n' "$out" | grep "$1"
}
check "job j7's end reached the new nexd: removed from the node's state" wait_until 60 left_state "$JOB"
check "job j7's exit code 7 is in the journal after the start" \
	wait_until 30 sh -c "journalctl -u nexd -o json --no-pager | grep $JOB | grep 'workload stopped' | grep -Eq '\"[A-Z_]*EXIT_CODE\":\"7\"'"
info "j7: $(journalctl -u nexd -o json --no-pager | grep "$JOB" | grep 'workload stopped' | tail -1)"
check "job j7 ran exactly once" test "$(grep -c ran /dev/shm/nex-jobruns)" = 1

# --- lameduck: workloads stop after the delay, then the service exits ---
# The packaged control_allow_others (status) again, for bob's call after the lame duck
# (a restart-only key; nexd runs since the socket started it).
set_config 's/"control_allow_others": "none"/"control_allow_others": "status"/'
check "systemctl restart nexd (control_allow_others=status)" systemctl restart nexd
check "active (running)" wait_until 90 running
check "socket mode 0666 with control_allow_others=status" test "$(stat -c %a /run/nex/nexd.sock)" = 666
check "workload x restored at start" wait_until 60 running_once x sleep
# 10 s: "right after" must come well inside the delay also on a loaded host.
T0=$(date +%s)
check "nexctl lameduck --delay 10s" nexctl lameduck --delay 10s
check "workload still running right after lameduck" pgrep -x sleep
check "lameduck: service exits" wait_until 90 inactive
T1=$(date +%s)
check "lameduck: workload stopped no sooner than the 10s delay" test $((T1 - T0)) -ge 10
check "lameduck: no workload process left" not pgrep -x sleep
check "lameduck: the native nexlet stopped too, its record removed" \
	nexlet_gone "$NEXLET"
info "after lameduck: Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus) took $((T1 - T0))s"
# bob (a local user outside nex) connects to the control socket of the drained node:
# nexd.socket, still listening, started nexd again for him (his status call answered
# by a new node that bids and takes workloads). A lame duck now stops nexd.socket too.
runuser -u bob -- nexctl status >/dev/null 2>&1
info "after bob's nexctl status: nexd $(prop ActiveState), nexd.socket $(systemctl show -P ActiveState nexd.socket)"
check "lameduck: bob's nexctl status does not start the drained node again" \
	test "$(prop ActiveState)" = inactive
check "lameduck: nexd.socket stopped with the drained node" not systemctl --quiet is-active nexd.socket
set_config 's/"control_allow_others": "status"/"control_allow_others": "none"/'

# --- upgrade: nexd re-executes the new binary in place; config edits, state and the
# workload's process are kept ---
check "systemctl start nexd (before upgrade)" systemctl start nexd
check "active (running) before upgrade" wait_until 90 running
check "systemctl start nexd started nexd.socket again (Requires=)" systemctl --quiet is-active nexd.socket
check "nexctl workload run --name y -- /bin/sleep 600" run_workload --name y -- /bin/sleep 600
check "workload y runs" wait_until 30 running_once y sleep
YPID=$(pgrep -x sleep | head -1)
MAIN=$(mainpid)
NEXLET=$(nexlet_pid)
check "upgrade with apt-get install of the newer .deb" apt-get install -y -q "$DEB_UP"
check "upgrade re-executed nexd in place (same MainPID, active, y listed)" \
	wait_until 90 upgraded_in_place "$MAIN" y
check "the re-executed nexd runs the new binary" sh -c "! readlink /proc/$MAIN/exe | grep -q deleted"
check "workload y kept its process across the upgrade ($YPID)" test "$(pgrep -x sleep)" = "$YPID"
# The old nexlet runs the replaced binary: it hands its workloads over to a nexlet of the
# new one.
new_nexlet() {
	p=$(nexlet_pid) && [ "$p" != "$NEXLET" ] && [ "$(nexlet_count)" = 1 ] && ! readlink "/proc/$p/exe" | grep -q deleted && return 0
	nexlet_diag "a new one, not $NEXLET"
	return 1
}
check "upgrade: the old native nexlet ($NEXLET) handed over to one of the new binary" wait_until 60 new_nexlet
# kill -0 also finds a zombie that its parent has not reaped yet: poll.
check "upgrade: the old native nexlet is gone" wait_until 30 sh -c "! kill -0 $NEXLET 2>/dev/null"
check "workload y listed running after the hand-over, same process" wait_until 60 same_sleep y "$YPID"
check "upgrade kept the /etc/nex/config.json edit" grep -q '"control_allow_others": "none"' /etc/nex/config.json
check "upgrade kept the node id" test "$(node_id)" = "$NODE"
info "installed: $(dpkg-query -W nexd)"

# --- remove stops the service and keeps state; purge deletes it. nexd is stopped first
# (live_restore): the nexlet and workload y outlive it, and removal must still drain
# them. ---
check "systemctl stop nexd (before remove)" systemctl stop nexd
check "stopped with live_restore: workload y and the native nexlet still run" \
	left_running "$YPID"
check "apt-get remove nexd" apt-get remove -y -q nexd
check "remove stopped nexd and nexd.socket" \
	sh -c '! systemctl --quiet is-active nexd && ! systemctl --quiet is-active nexd.socket && ! pgrep -x nexd'
check "remove drained the workloads first (no workload process left)" not pgrep -x sleep
check "remove stopped the outliving native nexlet" test "$(nexlet_count)" = 0
check "remove kept /var/lib/nex and /etc/nex/config.json" test -d /var/lib/nex -a -f /etc/nex/config.json
check "apt-get purge nexd" apt-get purge -y -q nexd
check "purge deleted /var/lib/nex" not test -e /var/lib/nex
check "purge left no nexlet record, FIFO or nexd process" \
	sh -c "! test -e $NEXLET_RECORD && ! ls /run/nex/supervise 2>/dev/null | grep -q . && ! pgrep -x nexd"
check "purge deleted /etc/nex/config.json" not test -e /etc/nex/config.json
check "purge left no enablement symlink or mask" \
	sh -c '! test -L /etc/systemd/system/multi-user.target.wants/nexd.service && ! test -L /etc/systemd/system/nexd.service &&
		! test -L /etc/systemd/system/sockets.target.wants/nexd.socket && ! test -L /etc/systemd/system/nexd.socket'

# --- systemd's DynamicUser= allocator skips a running workload's uid: the native nexlet
# holds systemd's lock on it, /run/systemd/dynamic-uid/<uid>. systemd tries the hash of
# the unit's user name first, so the probe service gets the same uid each time unless
# that uid is locked; nexd is given that one uid as its whole range. Before, the probe
# got the workload's uid. ---
probe_uid() { ps -o uid= -p "$(systemctl show -P MainPID nexuidprobe)" 2>/dev/null | tr -d ' '; }
other_uid() { local u; u=$(probe_uid); [ -n "$u" ] && [ "$u" != "$DUID" ]; }
probe_up() { # the DynamicUser= service nexuidprobe runs
	systemctl reset-failed nexuidprobe 2>/dev/null
	systemd-run -q -p DynamicUser=yes --unit=nexuidprobe /usr/bin/tail -f /dev/null &&
		wait_until 30 sh -c 'p=$(systemctl show -P MainPID nexuidprobe); test "$p" -gt 0 &&
			u=$(ps -o uid= -p "$p" | tr -d " ") && test -n "$u" && test "$u" -ne 0'
	# (its main pid exists before systemd's child has switched to the dynamic user: a
	# uid read right after MainPID appears can still be root's)
}
check "a DynamicUser= service (nexuidprobe) runs" probe_up
DUID=$(probe_uid)
info "systemd gives nexuidprobe uid $DUID"
check "that uid is in systemd's DynamicUser= range (61184-65519)" test "${DUID:-0}" -ge 61184 -a "${DUID:-0}" -le 65519
systemctl stop nexuidprobe
mkdir -p /etc/systemd/system/nexd.service.d
printf '[Service]\nEnvironment=NEX_WORKLOAD_UID_RANGE=%s-%s\n' "$DUID" "$DUID" >/etc/systemd/system/nexd.service.d/uid.conf
systemctl daemon-reload
check "dpkg -i with workload_uid_range $DUID-$DUID (a drop-in)" dpkg -i "$DEB"
check "active (running) with that range" wait_until 90 running
check "tmpfiles made /run/systemd/dynamic-uid" test -d /run/systemd/dynamic-uid
check "nexctl workload run --name u -- /bin/sleep 600" run_workload --name u -- /bin/sleep 600
check "workload u runs" wait_until 30 running_once u sleep
UPID=$(pgrep -x sleep | head -1)
check "workload u runs as uid $DUID" test "$(ps -o uid= -p "$UPID" | tr -d ' ')" = "$DUID"
check "nexd holds systemd's lock on uid $DUID (the file exists under the unit's sandbox)" test -f "/run/systemd/dynamic-uid/$DUID"
check "no warning that systemd's dynamic uid locks cannot be taken" \
	sh -c "! journalctl -u nexd --no-pager | grep -q \"systemd's dynamic uid locks\""
check "the DynamicUser= service starts again while workload u runs" probe_up
info "nexuidprobe now has uid $(probe_uid); workload u has $DUID"
check "systemd gave it another uid than workload u's $DUID (before: the same)" other_uid
systemctl stop nexuidprobe
# The native nexlet killed (-9) while nexd is held stopped (SIGSTOP), so that no next
# nexlet can come: nexd's copy of the lock (passed to it over its uid lock socket) keeps
# systemd off workload u's uid. Before, nobody held the lock in that window, and the
# probe got the workload's uid. nexd resumed, the next nexlet takes the copy over as it
# adopts workload u.
NEXLET=$(pgrep -f 'nexd nexlet native' | head -1)
check "the native nexlet runs (${NEXLET:-none})" test -n "$NEXLET"
check "nexd holds a copy of systemd's lock on uid $DUID" \
	wait_until 30 sh -c "ls -l /proc/$(mainpid)/fd | grep -q '/run/systemd/dynamic-uid/$DUID\$'"
NEXD=$(mainpid)
kill -STOP "$NEXD"
kill -9 "$NEXLET"
check "the nexlet is dead, nexd stopped" wait_until 10 sh -c "! test -d /proc/$NEXLET || grep -q '^State:.Z' /proc/$NEXLET/status"
check "the DynamicUser= service starts with the nexlet killed" probe_up
info "nexuidprobe now has uid $(probe_uid); workload u has $DUID"
check "systemd gave it another uid than workload u's $DUID (before: the same)" other_uid
systemctl stop nexuidprobe
kill -CONT "$NEXD"
check "a next native nexlet runs" wait_until 60 sh -c "p=\$(pgrep -f 'nexd nexlet native' | head -1); test -n \"\$p\" && test \"\$p\" != $NEXLET"
check "nexd handed it the lock kept for it" \
	wait_until 30 sh -c "journalctl -u nexd --no-pager | grep -q 'handed the nexlet the systemd uid locks kept for it'"
check "workload u kept its process ($UPID)" test "$(pgrep -x sleep | head -1)" = "$UPID"
check "the adoption found systemd's lock its own" \
	sh -c "! journalctl -u nexd --no-pager | grep -q \"is another process's\""
info "under nexd.service, /run is $(nsenter -t "$(mainpid)" -m -- sh -c 'touch /run/.nexd-rw-probe 2>/dev/null && rm -f /run/.nexd-rw-probe && echo writable || echo read-only' 2>&1)"
check "nexctl lameduck --delay 0s (workload u stops, its uid released)" nexctl lameduck --delay 0s
check "lameduck: service exits" wait_until 90 inactive
check "the release unlinked systemd's lock file of uid $DUID" wait_until 30 not test -e "/run/systemd/dynamic-uid/$DUID"
check "the DynamicUser= service starts once more" probe_up
check "after the release, systemd gives it uid $DUID again" test "$(probe_uid)" = "$DUID"
systemctl stop nexuidprobe
# The control: a unit that may not write /run/systemd/dynamic-uid (read-only for it;
# under ProtectSystem=strict, /run itself was writable in this guest, per the INFO line
# above) makes nexd warn, and systemd hands the running workload's uid out again: the
# attack the lock stops.
printf '[Service]\nReadWritePaths=\nReadWritePaths=/sys/fs/cgroup\nReadOnlyPaths=/run/systemd/dynamic-uid\n' >/etc/systemd/system/nexd.service.d/nolock.conf
systemctl daemon-reload
check "control: systemctl start nexd with /run/systemd/dynamic-uid read-only for it (a drop-in)" systemctl start nexd
check "control: active (running)" wait_until 90 running
check "control: nexd warns that systemd's dynamic uid locks cannot be taken" \
	wait_until 30 sh -c "journalctl -u nexd --no-pager | grep -q \"systemd's dynamic uid locks\""
check "control: nexctl workload run --name v -- /bin/sleep 600" run_workload --name v -- /bin/sleep 600
check "control: workload v runs" wait_until 30 running_once v sleep
check "control: workload v runs as uid $DUID" test "$(ps -o uid= -p "$(pgrep -x sleep | head -1)" | tr -d ' ')" = "$DUID"
check "control: the DynamicUser= service starts while workload v runs" probe_up
check "control: without the lock, systemd gives it workload v's uid $DUID" test "$(probe_uid)" = "$DUID"
systemctl stop nexuidprobe
check "control: nexctl lameduck --delay 0s" nexctl lameduck --delay 0s
check "control: lameduck: service exits" wait_until 90 inactive
rm -rf /etc/systemd/system/nexd.service.d
systemctl daemon-reload
check "apt-get purge nexd after the dynamic uid checks" apt-get purge -y -q nexd

# --- faults (issue 15) under real systemd, with an external nats-server: JetStream
# unavailable at start (degraded READY, no restart), then NATS gone for four watchdog
# intervals while a workload runs (no watchdog kill, the same workload process) ---
NATS_BIN=/mnt/pkgs/nats-server
OUTAGE=40 # seconds: four intervals of the WatchdogSec=10s set below
natsd_up() { # natsd_up [js]: nats-server on 127.0.0.1:4333 as the transient unit natsd
	systemctl reset-failed natsd 2>/dev/null
	if [ "${1:-}" = js ]; then
		systemd-run --quiet --unit=natsd "$NATS_BIN" -a 127.0.0.1 -p 4333 -js -sd /var/lib/natsd
	else
		systemd-run --quiet --unit=natsd "$NATS_BIN" -a 127.0.0.1 -p 4333
	fi
	wait_until 30 natsd_listens
}
natsd_listens() { (exec 3<>/dev/tcp/127.0.0.1/4333) 2>/dev/null; }
status_has() { prop StatusText | grep -q "$1"; }
# same_unit MAINPID NRESTARTS: active, the same main process, no restart since.
same_unit() { running_with_main "$1" && [ "$(nrestarts)" = "$2" ]; }
ready_again() { same_unit "$1" "$2" && status_has '^running'; }
nats_down_in_status() { nexctl --json status | tr -d ' \n' | grep -q '"nats":{[^}]*"connected":false'; }
degraded_in_nexctl() { nexctl status | grep -q 'degraded: waiting for JetStream'; }
no_watchdog_kill_since() { ! journalctl -u nexd --since "@$1" --no-pager | grep -qi 'watchdog timeout'; }
external_nats_config() {
	printf '%s\n' '{' \
		'  "namespace": "system",' \
		'  "nats": {"servers": ["nats://127.0.0.1:4333"]},' \
		'  "node": {"up": {"state": "kv", "startup_timeout": "10s", "live_restore": true}},' \
		'  "logger": {"level": "info", "format": "text"}' \
		'}' >/etc/nex/config.json
}

if [ ! -x "$NATS_BIN" ]; then
	fail "fault checks: no nats-server at $NATS_BIN (make systemd-test builds it)"
else
	check "dpkg -i again, for the fault checks" dpkg -i "$DEB"
	check "active (running) with the embedded NATS" wait_until 90 running
	# Lame duck, not stop: with live_restore a stop leaves the nexlet running, and it
	# could not register with the next nexd's other NATS server.
	check "nexctl lameduck --delay 0s (nothing left running)" nexctl lameduck --delay 0s
	check "lameduck: service exits" wait_until 90 inactive
	external_nats_config
	mkdir -p /etc/systemd/system/nexd.service.d
	printf '[Service]\nWatchdogSec=10s\n' >/etc/systemd/system/nexd.service.d/faults.conf
	systemctl daemon-reload
	check "external nats-server without JetStream up" natsd_up
	T=$(date +%s)
	check "systemctl start with JetStream unavailable returns (degraded READY after startup_timeout 10s)" \
		timeout 120 systemctl start nexd
	info "start returned after $(($(date +%s) - T))s; StatusText=$(prop StatusText)"
	MAIN=$(mainpid)
	N0=$(nrestarts)
	check "degraded start: active (running)" running
	check "degraded start: STATUS says degraded: waiting for JetStream" status_has 'degraded: waiting for JetStream'
	check "degraded start: nexctl status answers and says what nexd waits for" degraded_in_nexctl
	sleep 25
	check "degraded for 25s more (2.5 watchdog intervals): same MainPID, NRestarts unchanged ($N0)" same_unit "$MAIN" "$N0"
	systemctl stop natsd
	check "nats-server with JetStream up" natsd_up js
	check "JetStream back: fully ready (STATUS running), same MainPID, no restart" wait_until 90 ready_again "$MAIN" "$N0"
	info "StatusText=$(prop StatusText)"

	check "nexctl workload run --name z -- /bin/sleep 600" run_workload --name z -- /bin/sleep 600
	check "workload z runs" wait_until 30 running_once z sleep
	ZPID=$(pgrep -x sleep | head -1)
	systemctl stop natsd
	T=$(date +%s)
	check "NATS down: STATUS says nats disconnected" wait_until 60 status_has 'nats disconnected'
	check "NATS down: nexctl status shows NATS disconnected" wait_until 30 nats_down_in_status
	while [ "$(date +%s)" -lt $((T + OUTAGE)) ]; do sleep 1; done
	info "StatusText after ${OUTAGE}s without NATS: $(prop StatusText)"
	check "${OUTAGE}s NATS outage (WatchdogSec=10s): same MainPID, NRestarts unchanged" same_unit "$MAIN" "$N0"
	check "no watchdog timeout in the journal during the outage" no_watchdog_kill_since "$T"
	check "workload z kept its process through the outage ($ZPID)" test "$(pgrep -x sleep)" = "$ZPID"
	check "nats-server back" natsd_up js
	check "NATS back: STATUS says nats connected" wait_until 90 status_has 'nats connected'
	check "workload z listed running again, the same process" wait_until 60 same_sleep z "$ZPID"
	check "still the same MainPID, NRestarts unchanged" same_unit "$MAIN" "$N0"

	rm -rf /etc/systemd/system/nexd.service.d
	systemctl daemon-reload
	check "apt-get purge nexd after the fault checks" apt-get purge -y -q nexd
	systemctl stop natsd
	rm -rf /var/lib/natsd
fi

finish
