package native

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/nexlet/secrets"
	"github.com/nexd-project/nexd/protocol"
)

func TestJobExitCodeAndLogs(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	uri := script(t, `echo "out line"; echo "err line" >&2; exit 7`)
	fn.mustStart("job1", startReq(protocol.LifecycleJob, "myjob", map[string]any{"uri": uri}, fn.creds()))

	ev := fn.stoppedEvent("job1")
	if ev.Error == nil || ev.Error.Code != "7" {
		t.Fatalf("WORKLOADSTOPPED error = %+v, want code 7", ev.Error)
	}
	if ev.Metadata["exit_code"] != "7" || ev.WorkloadType != RegisterType || ev.Namespace != testNS {
		t.Errorf("event = %+v", ev)
	}
	if fn.countEvents(protocol.EventWorkloadStarted, "job1") != 1 {
		t.Errorf("want one WORKLOADSTARTED")
	}
	s, ok := fn.summary("job1")
	if !ok || s.WorkloadState != protocol.WorkloadError || s.Metadata["exit_code"] != "7" || s.Name != "myjob" {
		t.Errorf("summary = %+v", s)
	}
	fn.waitLog("job1", "stdout", "out line")
	fn.waitLog("job1", "stderr", "err line")
	fn.mu.Lock()
	for _, m := range fn.logs {
		if m.Header.Get(nexlet.FeedHeader(protocol.HeaderNamespace)) != testNS {
			t.Errorf("log %s: namespace header in %v", m.Subject, m.Header)
		}
		if _, ok := m.Header[nexlet.FeedHeader(protocol.HeaderGroup)]; !ok {
			t.Errorf("log %s: no %s header", m.Subject, protocol.HeaderGroup)
		}
	}
	fn.mu.Unlock()

	// A successful job ends stopped with exit code 0 and no error.
	fn.mustStart("job2", startReq(protocol.LifecycleJob, "ok", map[string]any{"uri": script(t, "exit 0")}, fn.creds()))
	if ev := fn.stoppedEvent("job2"); ev.Error != nil || ev.Metadata["exit_code"] != "0" {
		t.Errorf("job2 event = %+v", ev)
	}
	if s, _ := fn.summary("job2"); s.WorkloadState != protocol.WorkloadStopped {
		t.Errorf("job2 state = %s", s.WorkloadState)
	}
	// Another namespace neither sees nor stops it.
	if ws := fn.query("other"); len(ws) != 0 {
		t.Errorf("namespace other sees %+v", ws)
	}
	if r := fn.stop("job2", "other"); r.Stopped {
		t.Errorf("namespace other stopped job2: %+v", r)
	}
	if ws := fn.query(testNS, "ok"); len(ws) != 1 || ws[0].ID != "job2" {
		t.Errorf("filter by name: %+v", ws)
	}
	// Stopping a finished job forgets it.
	if r := fn.stop("job1", testNS); !r.Stopped {
		t.Errorf("stop of finished job: %+v", r)
	}
	if _, ok := fn.summary("job1"); ok {
		t.Errorf("job1 still listed after stop")
	}
}

func TestServiceCrashLoopEndsInError(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	counter := filepath.Join(sharedDir(t), "runs")
	uri := script(t, `echo run >> "$1"; exit 3`)
	fn.mustStart("svc1", startReq(protocol.LifecycleService, "crashy", map[string]any{
		"uri": uri, "argv": []string{counter}, "restart": map[string]any{"max": 2, "backoff": "50ms"}}, fn.creds()))
	ev := fn.stoppedEvent("svc1")
	if ev.Error == nil || ev.Error.Code != "3" || !strings.Contains(ev.Error.Message, "restart limit of 2") {
		t.Fatalf("event error = %+v", ev.Error)
	}
	s, _ := fn.summary("svc1")
	if s.WorkloadState != protocol.WorkloadError || s.Metadata["restarts"] != "2" {
		t.Errorf("summary = %+v", s)
	}
	b, _ := os.ReadFile(counter)
	if runs := strings.Count(string(b), "run"); runs != 3 {
		t.Errorf("runs = %d, want 3 (first start + 2 restarts)", runs)
	}
}

func TestStopKillsSIGTERMIgnorerAtGrace(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	uri := script(t, `trap '' TERM; echo ready; while :; do sleep 0.05; done`)
	fn.mustStart("stubborn", startReq(protocol.LifecycleService, "stubborn", map[string]any{"uri": uri, "stop_grace": "300ms"}, fn.creds()))
	fn.waitLog("stubborn", "stdout", "ready")
	s, _ := fn.summary("stubborn")
	pid, _ := strconv.Atoi(s.Metadata["pid"])
	if pid == 0 || !alive(pid) {
		t.Fatalf("no live pid in %+v", s)
	}
	if r := fn.stop("stubborn", testNS); !r.Stopped || r.ID != "stubborn" || r.WorkloadType != RegisterType {
		t.Fatalf("stop = %+v", r)
	}
	// The reply comes when the workload is gone.
	if alive(pid) || len(fn.procsOf("stubborn")) != 0 {
		t.Errorf("workload still alive after the stop reply")
	}
	ev := fn.stoppedEvent("stubborn")
	if ev.Error == nil || !strings.Contains(ev.Error.Message, "killed after a stop grace of 300ms") {
		t.Errorf("event = %+v", ev.Error)
	}
	if _, ok := fn.summary("stubborn"); ok {
		t.Errorf("stopped workload still listed")
	}
}

func TestStopLeavesNoGrandchild(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	pidFile := filepath.Join(sharedDir(t), "gc.pid")
	uri := script(t, `sleep 1000 & echo $! > "$1"; echo forked; wait`)
	fn.mustStart("forker", startReq(protocol.LifecycleService, "forker", map[string]any{"uri": uri, "argv": []string{pidFile}}, fn.creds()))
	fn.waitLog("forker", "stdout", "forked")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	gc, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if !alive(gc) {
		t.Fatalf("grandchild %d not running", gc)
	}
	if r := fn.stop("forker", testNS); !r.Stopped {
		t.Fatalf("stop = %+v", r)
	}
	if alive(gc) {
		t.Errorf("grandchild %d survived the stop", gc)
	}
	if p := fn.procsOf("forker"); len(p) != 0 {
		t.Errorf("processes left: %v", p)
	}
}

func TestSealedEnvironmentAndSecrets(t *testing.T) {
	fn := newFakeNode(t)
	st := secrets.FileStore{Dir: t.TempDir()}
	if err := st.Set(testNS, "DB_PASS", "from-secret-store"); err != nil {
		t.Fatal(err)
	}
	tn := fn.startNexlet(Config{Secrets: st})
	t.Setenv("NEXD_TEST_LEAK", "leaked")

	client, _ := nkeys.CreateCurveKeys()
	clientPub, _ := client.PublicKey()
	clear, _ := json.Marshal(map[string]string{"SEALED_V": "s3cret-value"})
	sealed, err := client.Seal(clear, tn.XKey())
	if err != nil {
		t.Fatal(err)
	}
	uri := script(t, `echo "sealed=$SEALED_V plain=$PLAIN secret=$FROM_STORE arg=$1"; env | cut -d= -f1 | sort | tr '\n' ' '; echo`)
	req := startReq(protocol.LifecycleJob, "sealed", map[string]any{
		"uri": uri, "argv": []string{"plain-arg"},
		"environment":           map[string]string{"PLAIN": "p", "FROM_STORE": "secret://DB_PASS"},
		"encrypted_environment": protocol.EncEnv{Base64EncryptedEnv: base64.StdEncoding.EncodeToString(sealed), EncryptedBy: clientPub},
	}, fn.creds())
	fn.mustStart("sealed", req)
	fn.waitLog("sealed", "stdout", "sealed=s3cret-value plain=p secret=from-secret-store arg=plain-arg")
	fn.stoppedEvent("sealed")
	var names string
	for _, l := range fn.logLines("sealed", "stdout") {
		if strings.Contains(l, "NEX_WORKLOAD_ID") {
			names = l
		}
	}
	for _, want := range []string{"NEX_WORKLOAD_NATS_SERVERS", "NEX_WORKLOAD_NATS_NKEY", "NEX_WORKLOAD_NATS_B64_JWT", "NEX_WORKLOAD_ID", "NEX_NAMESPACE", "SEALED_V"} {
		if !strings.Contains(names, want) {
			t.Errorf("environment lacks %s: %q", want, names)
		}
	}
	if strings.Contains(names, "NEXD_TEST_LEAK") {
		t.Errorf("the nexlet's environment leaked into the workload: %q", names)
	}

	// A secret:// argument is refused, naming it (every local user reads a process's
	// arguments in /proc/<pid>/cmdline; e2e TestAttackLocalUserReadsArgvSecret), also
	// for a key the store does not hold; nothing starts.
	for i, key := range []string{"DB_PASS", "MISSING"} {
		id := "argvsecret" + strconv.Itoa(i)
		r := fn.start(id, startReq(protocol.LifecycleJob, id, map[string]any{"uri": uri, "argv": []string{"--password", "secret://" + key}}, fn.creds()))
		if r.code == "" || !strings.Contains(r.errText, "argv[1] is a secret:// reference") || !strings.Contains(r.errText, "environment") {
			t.Errorf("secret://%s in argv: %s %q; want refused naming argv[1] and the environment", key, r.code, r.errText)
		}
		if _, ok := fn.summary(id); ok || len(fn.procsOf(id)) != 0 {
			t.Errorf("secret://%s in argv: the workload started anyway", key)
		}
	}

	// GETWORKLOAD returns the request with the environment still sealed.
	r, err := fn.request(protocol.GetWorkloadSubject(testNode, "sealed"), map[string]string{}, waitLong)
	if err != nil || r.code != "" {
		t.Fatalf("GETWORKLOAD: %v %s %s", err, r.code, r.errText)
	}
	if bytes.Contains(r.data, []byte("s3cret-value")) {
		t.Fatalf("GETWORKLOAD leaks the sealed value: %s", r.data)
	}
	var got protocol.StartWorkloadRequest
	if err := protocol.Decode(r.data, &got); err != nil {
		t.Fatal(err)
	}
	if got.RunRequest != req.Request.RunRequest {
		t.Errorf("run_request changed:\n%s\n%s", got.RunRequest, req.Request.RunRequest)
	}

	// A clone target gets it re-sealed for its own key, still never in clear.
	target, _ := nkeys.CreateCurveKeys()
	targetPub, _ := target.PublicKey()
	r, err = fn.request(protocol.GetWorkloadSubject(testNode, "sealed"), protocol.CloneWorkloadRequest{Namespace: testNS, NewTargetXKey: targetPub}, waitLong)
	if err != nil || r.code != "" || bytes.Contains(r.data, []byte("s3cret-value")) {
		t.Fatalf("GETWORKLOAD for clone: %v %s %s", err, r.code, r.data)
	}
	_ = protocol.Decode(r.data, &got)
	var rr StartRequest
	if err := json.Unmarshal([]byte(got.RunRequest), &rr); err != nil {
		t.Fatal(err)
	}
	data, _ := base64.StdEncoding.DecodeString(rr.EncryptedEnvironment.Base64EncryptedEnv)
	opened, err := target.Open(data, rr.EncryptedEnvironment.EncryptedBy)
	if err != nil || !bytes.Contains(opened, []byte("s3cret-value")) {
		t.Errorf("clone target cannot open the re-sealed env: %v %q", err, opened)
	}

	// Another namespace cannot see it.
	if _, err := fn.request(protocol.GetWorkloadSubject(testNode, "sealed"), protocol.CloneWorkloadRequest{Namespace: "other"}, 500*time.Millisecond); err == nil {
		t.Errorf("GETWORKLOAD from another namespace got a reply")
	}
}

func TestNatsArtifactFetchedRunAndRemoved(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	js, err := jetstream.New(fn.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: "artifacts"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := obs.PutBytes(ctx, "hello_v1", []byte("#!/bin/sh\necho from-object-store\nexec sleep 1000\n")); err != nil {
		t.Fatal(err)
	}
	fn.mustStart("art1", startReq(protocol.LifecycleService, "art", map[string]any{"uri": "nats://artifacts/hello:v1"}, fn.creds()))
	fn.waitLog("art1", "stdout", "from-object-store")
	dir := filepath.Join(tn.WorkloadsDir(), "art1")
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm()&0o007 != 0 {
		t.Fatalf("workload dir: %v %v", fi, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "artifact")); err != nil {
		t.Errorf("artifact: %v", err)
	}
	if s, _ := fn.summary("art1"); s.Metadata["sha256"] == "" {
		t.Errorf("no digest in %+v", s.Metadata)
	}
	fn.stop("art1", testNS)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("workload dir still there after stop: %v", err)
	}

	// A missing object fails the start and leaves nothing.
	r := fn.start("art2", startReq(protocol.LifecycleJob, "art", map[string]any{"uri": "nats://artifacts/nope"}, fn.creds()))
	if r.code != "100" || !strings.Contains(r.errText, `object "nope_latest"`) {
		t.Errorf("missing object: %s %q", r.code, r.errText)
	}
	if _, err := os.Stat(filepath.Join(tn.WorkloadsDir(), "art2")); !os.IsNotExist(err) {
		t.Errorf("dir of failed start left: %v", err)
	}
}

func TestBadStartRequestsStartNothing(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{Secrets: secrets.FileStore{Dir: t.TempDir()}})
	good := script(t, "exit 0")
	notExec := filepath.Join(publicDir(t), "plain") // where the workload's user may look
	_ = os.WriteFile(notExec, []byte("x"), 0o644)
	marker := filepath.Join(sharedDir(t), "ran")
	runs := script(t, `touch `+marker)
	tests := []struct {
		name string
		run  map[string]any
		lc   protocol.Lifecycle
		want string
	}{
		{"missing uri", map[string]any{"argv": []string{"x"}}, protocol.LifecycleJob, "uri is required"},
		{"relative path", map[string]any{"uri": "file://bin/true"}, protocol.LifecycleJob, "must be absolute"},
		{"unknown scheme", map[string]any{"uri": "oci://example/img"}, protocol.LifecycleJob, `unsupported scheme "oci"`},
		{"no scheme", map[string]any{"uri": "/bin/true"}, protocol.LifecycleJob, "no scheme"},
		{"missing file", map[string]any{"uri": "file:///nonexistent/prog"}, protocol.LifecycleJob, "no such file"},
		{"not executable", map[string]any{"uri": "file://" + notExec}, protocol.LifecycleJob, "not executable"},
		{"bad nats uri", map[string]any{"uri": "nats://bucketonly"}, protocol.LifecycleJob, "nats://<bucket>/<name>"},
		{"bad memory", map[string]any{"uri": runs, "limits": map[string]any{"memory_max": "lots"}}, protocol.LifecycleJob, "limits.memory_max"},
		{"negative memory", map[string]any{"uri": runs, "limits": map[string]any{"memory_max": -5}}, protocol.LifecycleJob, "limits.memory_max"},
		{"negative cpu", map[string]any{"uri": runs, "limits": map[string]any{"cpu_max": -1}}, protocol.LifecycleJob, "limits.cpu_max"},
		{"negative pids", map[string]any{"uri": runs, "limits": map[string]any{"pids_max": -1}}, protocol.LifecycleJob, "limits.pids_max"},
		{"bad grace", map[string]any{"uri": runs, "stop_grace": "soon"}, protocol.LifecycleJob, "stop_grace"},
		{"bad policy", map[string]any{"uri": runs, "restart": map[string]any{"policy": "sometimes"}}, protocol.LifecycleService, "restart.policy"},
		{"unknown field", map[string]any{"uri": runs, "stdin": "x"}, protocol.LifecycleJob, `unknown field "stdin"`},
		{"relative workdir", map[string]any{"uri": runs, "workdir": "tmp"}, protocol.LifecycleJob, "workdir"},
		{"reserved env", map[string]any{"uri": runs, "environment": map[string]string{"NEX_WORKLOAD_ID": "x"}}, protocol.LifecycleJob, "set by the nexlet"},
		{"missing secret", map[string]any{"uri": runs, "environment": map[string]string{"K": "secret://NOPE"}}, protocol.LifecycleJob, "secret not found"},
		{"bad sealed env", map[string]any{"uri": runs, "encrypted_environment": map[string]string{"base64_encrypted_env": "AAAA", "encrypted_by": "XBAD"}}, protocol.LifecycleJob, "encrypted_environment"},
		{"function lifecycle", map[string]any{"uri": runs}, protocol.LifecycleFunction, "not supported"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := "bad" + strconv.Itoa(i)
			r := fn.start(id, startReq(tc.lc, "bad", tc.run, fn.creds()))
			// The request's own faults are a bad request (400, as the node's are); what
			// the host holds (a program, a secret, the sealed environment's key) is
			// looked at later and answered with the nexlet's own code (100).
			want := nexlet.BadRequestCode
			switch tc.name {
			case "missing secret", "bad sealed env", "missing file", "not executable":
				want = nexlet.ErrorCode
			}
			if r.code != want || !strings.Contains(r.errText, tc.want) {
				t.Errorf("got %s %q, want code %s containing %q", r.code, r.errText, want, tc.want)
			}
			var body protocol.StartWorkloadResponse
			if err := json.Unmarshal(r.data, &body); err != nil || body.ID != id {
				t.Errorf("error body %q: %v", r.data, err)
			}
		})
	}
	// Malformed and mistyped messages get an error reply, and the nexlet keeps serving.
	for _, raw := range []string{"", "{", "null", `{"request":5,"workload_creds":{}}`, `[]`} {
		r, err := fn.request(protocol.StartWorkloadSubject(testNode, testAgent, "junk"), []byte(raw), waitLong)
		if err != nil || r.code != nexlet.BadRequestCode {
			t.Errorf("STARTWORKLOAD %q: %v %q", raw, err, r.code)
		}
	}
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		t.Errorf("a bad request ran its program")
	}
	if ws := fn.query(protocol.SystemNamespace); len(ws) != 0 {
		t.Errorf("workloads after bad requests: %+v", ws)
	}
	if ents, _ := os.ReadDir(tn.WorkloadsDir()); len(ents) != 0 {
		t.Errorf("workload dirs left: %v", ents)
	}
	fn.mustStart("good", startReq(protocol.LifecycleJob, "good", map[string]any{"uri": good}, fn.creds()))
	fn.stoppedEvent("good")
}

func TestReplayAdoptsLiveAndStartsDead(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	uri := script(t, `echo up; exec sleep 1000`)
	live := startReq(protocol.LifecycleService, "live", map[string]any{"uri": uri}, fn.creds())
	dead := startReq(protocol.LifecycleService, "dead", map[string]any{"uri": uri}, fn.creds())
	fn.mustStart("live", live)
	fn.waitLog("live", "stdout", "up")
	s, _ := fn.summary("live")
	livePid, _ := strconv.Atoi(s.Metadata["pid"])

	fn.mustStart("orphan", startReq(protocol.LifecycleService, "orphan", map[string]any{"uri": uri}, fn.creds()))
	fn.waitLog("orphan", "stdout", "up")
	orphan := fn.procsOf("orphan")
	t.Cleanup(func() { // the test kills it below; not if it fails before that
		for _, p := range orphan {
			_ = syscall.Kill(-p, syscall.SIGKILL)
		}
	})
	first.crash()
	if !alive(livePid) || len(orphan) != 1 {
		t.Fatalf("workloads died with the nexlet")
	}

	// The node replays live and dead but no longer knows orphan.
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"live": live, "dead": dead}
	fn.mu.Unlock()
	// A dead leftover's directory goes; a live one the node forgot is left running.
	if err := os.MkdirAll(filepath.Join(first.WorkloadsDir(), "gone"), 0o700); err != nil {
		t.Fatal(err)
	}
	fn.startNexlet(Config{RuntimeDir: runtime})
	// It registers saying what it holds: the records of both live workloads, whether
	// or not the node still knows them, and not the one never started here.
	fn.mu.Lock()
	held := fn.lastReg.Workloads
	fn.mu.Unlock()
	if held == nil || !slices.Contains(*held, "live") || !slices.Contains(*held, "orphan") || slices.Contains(*held, "dead") {
		t.Errorf("registration after the crash reports holding %v, want live and orphan", held)
	}
	testkit.Eventually(t, "dead leftover dir removed", func() bool {
		_, err := os.Stat(filepath.Join(first.WorkloadsDir(), "gone"))
		return os.IsNotExist(err)
	})
	if !alive(orphan[0]) {
		t.Errorf("a workload the node did not replay was killed")
	}
	_ = syscall.Kill(-orphan[0], syscall.SIGKILL)
	testkit.Eventually(t, "both workloads running", func() bool {
		ws := fn.query(testNS)
		return len(ws) == 2 && ws[0].WorkloadState == protocol.WorkloadRunning && ws[1].WorkloadState == protocol.WorkloadRunning
	})
	if p := fn.procsOf("live"); !slices.Equal(p, []int{livePid}) {
		t.Errorf("live workload processes = %v, want only the adopted %d", p, livePid)
	}
	testkit.Eventually(t, "dead workload started", func() bool { return len(fn.procsOf("dead")) == 1 })
	if n := fn.countEvents(protocol.EventWorkloadStarted, "live"); n != 1 {
		t.Errorf("live workload started %d times", n)
	}
	// An adopted workload that dies is noticed and restarted by its policy.
	if err := syscall.Kill(livePid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "adopted workload restarted", func() bool {
		p := fn.procsOf("live")
		return len(p) == 1 && p[0] != livePid
	})
	livePid = fn.procsOf("live")[0]
	// A second start of a running id is refused: never two copies.
	if r := fn.start("live", live); r.code != "100" || !strings.Contains(r.errText, "already running") {
		t.Errorf("second start: %s %q", r.code, r.errText)
	}
	// The adopted workload stops like any other.
	if r := fn.stop("live", testNS); !r.Stopped {
		t.Fatalf("stop adopted: %+v", r)
	}
	if alive(livePid) {
		t.Errorf("adopted workload survived its stop")
	}
}

// TestReplayedArgvSecretKeepsRunning: a workload deployed before secret:// arguments were
// refused, with one in its argv, is replayed to the nexlet (a restart of nexd or of its
// host): it runs on (refused, it would be listed as failed and left unmanaged), with a
// warning logged; new starts of it are refused (TestSealedEnvironmentAndSecrets).
func TestReplayedArgvSecretKeepsRunning(t *testing.T) {
	fn := newFakeNode(t)
	st := secrets.FileStore{Dir: t.TempDir()}
	if err := st.Set(testNS, "DB_PASS", "from-secret-store"); err != nil {
		t.Fatal(err)
	}
	req := startReq(protocol.LifecycleService, "oldargv", map[string]any{
		"uri": script(t, `echo "arg=$1"; exec sleep 1000`), "argv": []string{"secret://DB_PASS"}}, fn.creds())
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"oldargv": req}
	fn.mu.Unlock()
	fn.startNexlet(Config{Secrets: st})
	fn.waitLog("oldargv", "stdout", "arg=from-secret-store")
	if s, ok := fn.summary("oldargv"); !ok || s.WorkloadState != protocol.WorkloadRunning {
		t.Errorf("replayed workload: %+v %v; want running", s, ok)
	}
}
