# Shared helpers of the in-guest suites (sourced; POSIX sh with bash features avoided
# only where cheap: the guests have bash, so bash is used).
# Every check prints exactly one PASS:/FAIL: line; the suite's exit status is the number
# of failed checks (capped at 100).
FAILS=0
PASSES=0
SUITE=${SUITE:-guest}

pass() { PASSES=$((PASSES + 1)); echo "PASS: $*"; }
fail() { FAILS=$((FAILS + 1)); echo "FAIL: $*"; }
info() { echo "INFO: $*"; }

# check DESCRIPTION CMD...: PASS when CMD exits 0; on failure show its last output lines.
check() {
	local desc=$1 out
	shift
	if out=$("$@" 2>&1); then
		pass "$desc"
	else
		fail "$desc"
		printf '%s\n' "$out" | tail -15 | sed 's/^/      | /'
	fi
}

# not CMD...: inverts an exit status (for "is refused" checks).
not() { ! "$@"; }

# wait_until SECONDS CMD...: polls CMD every 0.5 s until it succeeds or time runs out.
wait_until() {
	local end=$(($(date +%s) + $1))
	shift
	until "$@" >/dev/null 2>&1; do
		[ "$(date +%s)" -ge "$end" ] && { "$@"; return 1; }
		sleep 0.5
	done
}

prop() { systemctl show -P "$1" nexd.service; }
running() { [ "$(prop ActiveState)/$(prop SubState)" = active/running ]; }
# inactive: nexd.service has stopped, its main process is gone. Not `! is-active`: nexd
# sends STOPPING=1 when it starts to stop, and the unit is "deactivating" (not active)
# while nexd still drains, stops its nexlet and the embedded NATS server.
inactive() { [ "$(prop ActiveState)" = inactive ]; }
mainpid() { prop MainPID; }
nrestarts() { prop NRestarts; }

# json_field KEY: first "KEY": "value" of the JSON on stdin (the guest has no jq).
json_field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" | head -1; }
node_id() { nexctl --json status | json_field node_id; }

# count_running NAME: workloads named NAME in state running on this node.
count_running() {
	nexctl --json workloads | tr -d ' \n' | sed 's/},{/}\n{/g' |
		grep -c "\"name\":\"$1\",.*\"state\":\"running\"" || true
}
running_once() { [ "$(count_running "$1")" = 1 ] && [ "$(pgrep -cx "$2")" = 1 ]; }
# same_sleep NAME PID: workload NAME is listed running once and the only sleep is PID
# (adopted, not started again).
same_sleep() { [ "$(count_running "$1")" = 1 ] && [ "$(pgrep -x sleep)" = "$2" ]; }

# logs_are ID WANT ARGS...: `nexctl workload logs ID ARGS...` prints exactly WANT on stdout
# (shown on failure).
logs_are() {
	local id=$1 want=$2 got
	shift 2
	got=$(nexctl workload logs "$id" "$@") || return 1
	[ "$got" = "$want" ] || { printf 'got:\n%s\nwant:\n%s\n' "$got" "$want"; return 1; }
}

set_config() { # set_config SED-EXPR: edit /etc/nex/config.json in place
	sed -i "$1" /etc/nex/config.json
}

finish() {
	if [ "$FAILS" -gt 0 ]; then
		echo "---- diagnostics ($SUITE) ----"
		systemctl status nexd.service --no-pager -l 2>&1 | head -30
		journalctl -u nexd.service --no-pager -n 60 -o short-monotonic 2>&1
	fi
	echo "SUMMARY($SUITE): $PASSES passed, $FAILS failed"
	[ "$FAILS" -gt 100 ] && FAILS=100
	exit "$FAILS"
}

# Conditions on nexd.service's main process, for check and wait_until.
running_with_main() { running && [ "$(mainpid)" = "$1" ]; }
upgraded_in_place() { running_with_main "$1" && [ "$(count_running "$2")" = 1 ]; }
running_new_main() { running && [ "$(mainpid)" != "$1" ] && [ "$(mainpid)" != 0 ]; }
watchdog_ok() { running_with_main "$1" && [ "$(nrestarts)" = 0 ]; }
restarted_by_watchdog() { running_new_main "$1" && [ "$(nrestarts)" -ge 1 ]; }
stopped_cleanly() { [ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ]; }
# log_level_is LEVEL: the node's resolved logger.level (nexctl --json config: {"settings":
# {"logger.level": {"value": …, "origin": …}}}).
log_level_is() { nexctl --json config | tr -d ' \n' | grep -q "\"logger.level\":{\"value\":\"$1\""; }
# has_procs CGROUP_DIR: the cgroup holds a process (cgroupfs files report size 0, so
# test -s cannot tell).
has_procs() { grep -q . "$1/cgroup.procs" 2>/dev/null; }
# no_node_procs: no nexd (nexlets are "nexd nexlet …" too) and no test workload left;
# shows what is left (a Z in STAT: a zombie nobody reaped yet).
no_node_procs() {
	local p
	p=$(pgrep -x 'nexd|sleep|tail' | paste -sd,)
	[ -z "$p" ] && return 0
	ps -o pid,ppid,stat,etimes,args -p "$p"
	return 1
}
# nexlet_pid: the native nexlet's pid as nexd recorded it (<state_dir>/nexlets/native/
# process.json), when that process runs.
NEXLET_RECORD=/var/lib/nex/nexlets/native/process.json
nexlet_pid() {
	local p
	p=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$NEXLET_RECORD" 2>/dev/null)
	[ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"
}
# nexlet_count: processes of the native nexlet ("nexd nexlet native").
nexlet_count() { pgrep -cf '^/usr/bin/nexd nexlet native' || true; }
# same_nexlet PID: the recorded native nexlet is PID, and it is the only one (adopted,
# not started a second time).
same_nexlet() {
	[ "$(nexlet_pid)" = "$1" ] && [ "$(nexlet_count)" = 1 ] && return 0
	nexlet_diag "$1"
	return 1
}
# nexlet_diag WANT: what the record says and which nexlet processes run.
nexlet_diag() {
	echo "want nexlet ${1:-?}; $NEXLET_RECORD: $(cat "$NEXLET_RECORD" 2>&1)"
	pgrep -af 'nexd nexlet' | while read -r p rest; do
		echo "  $p ppid=$(ps -o ppid= -p "$p" | tr -d ' ') exe=$(readlink /proc/"$p"/exe) $rest"
	done
}
# nexlet_gone PID: the native nexlet PID ended, none runs and its record is gone.
nexlet_gone() { ! kill -0 "$1" 2>/dev/null && [ "$(nexlet_count)" = 0 ] && ! test -e "$NEXLET_RECORD"; }
# left_running PID: with nexd stopped, workload PID (the only sleep) and a recorded
# native nexlet still run.
left_running() { [ "$(pgrep -x sleep)" = "$1" ] && [ -n "$(nexlet_pid)" ]; }
# in_tmp PID: the process's /tmp (nexd.service's own, in its mount namespace) is still
# usable.
in_tmp() { nsenter -t "$1" -m -- sh -c 'f=/tmp/.nexd-probe.$$ && touch "$f" && rm "$f"'; }
# run_workload ARGS...: nexctl workload run with patience for a slow (TCG) guest: wait up
# to 30 s for the node's bid and end the auction at the first bid; two retries (a node
# whose nexlet's heartbeat is late on a loaded host declines to bid for that moment).
run_workload() {
	local try
	for try in 1 2 3; do
		nexctl --nats.timeout 30s workload run --bids 1 "$@" && return 0
		[ "$try" = 3 ] || sleep $((try * 3))
	done
	return 1
}
