package native

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// putObjects makes the bucket "artifacts" with the given objects.
func putObjects(t *testing.T, fn *fakeNode, objs map[string][]byte) {
	t.Helper()
	// Acks of a few MB stored by a race-built server on a loaded machine can take more
	// than the client's default 5 s per publish (a put failed so in make test).
	js, err := jetstream.New(fn.nc, jetstream.WithDefaultTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(t.Context(), jetstream.ObjectStoreConfig{Bucket: "artifacts"})
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range objs {
		if _, err := obs.PutBytes(t.Context(), name, b); err != nil {
			t.Fatal(err)
		}
	}
}

func storeFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// TestArtifactStoreSharedPrivate: a nats:// artifact lands once in the store on disk
// (named by its digest, root's, 0555, in a 0700 directory), is shared by two workloads
// of it, runs from the descriptor the nexlet hands over (an ELF binary and a #!
// script), is removed when its last workload stops, and neither another workload's
// dynamic uid nor a local user can read or replace it; the workload cannot write its
// own. The same attacks run as root show that they do detect access.
func TestArtifactStoreSharedPrivate(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: workloads under dynamic uids")
	}
	fn := newFakeNode(t)
	store := filepath.Join(t.TempDir(), "state", "artifacts")
	tn := fn.startNexlet(Config{ArtifactDir: store})
	sleepBin, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	putObjects(t, fn, map[string][]byte{
		"sleeper_v1": sleepBin,
		// Its own artifact is fd 3: writing through it must fail.
		"selfwrite_v1": []byte("#!/bin/sh\necho \"zero=$0\"\nif echo x >> /proc/self/fd/3; then echo SELF-WRITE-WORKED; else echo self-write-denied; fi\nexec sleep 1000\n"),
	})
	art := func(obj string, argv ...string) map[string]any {
		return map[string]any{"uri": "nats://artifacts/" + obj, "argv": argv}
	}
	fn.mustStart("a1", startReq(protocol.LifecycleService, "a1", art("sleeper:v1", "1000"), fn.creds()))
	fn.mustStart("a2", startReq(protocol.LifecycleService, "a2", art("sleeper:v1", "1000"), fn.creds()))
	fn.mustStart("s1", startReq(protocol.LifecycleService, "s1", art("selfwrite:v1"), fn.creds()))
	fn.waitLog("s1", "stdout", "self-write-denied")
	fn.waitLog("s1", "stdout", "zero=/proc/self/fd/3")

	files := storeFiles(t, store)
	if len(files) != 2 {
		t.Fatalf("store holds %v, want one file per artifact (2)", files)
	}
	s1, _ := fn.summary("a1")
	shared := tn.arts.path(testNS, s1.Metadata["sha256"])
	fi, err := os.Stat(shared)
	if err != nil {
		t.Fatalf("a1's artifact (digest %q) not in the store: %v", s1.Metadata["sha256"], err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o555 || st.Uid != 0 {
		t.Errorf("stored artifact: mode %v uid %d, want 0555 root", fi.Mode(), st.Uid)
	}
	if fi, err := os.Stat(store); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("store dir: %v %v, want 0700", fi, err)
	}
	for _, id := range []string{"a1", "a2"} {
		if l, err := os.Readlink(filepath.Join(tn.WorkloadsDir(), id, artifactLink)); err != nil || l != shared {
			t.Errorf("%s's link: %q %v, want %s", id, l, err, shared)
		}
	}
	pids := fn.procsOf("a1")
	if len(pids) != 1 {
		t.Fatalf("a1 processes %v", pids)
	}
	victim := strconv.Itoa(pids[0])
	if exe, _ := os.Readlink("/proc/" + victim + "/exe"); exe != shared {
		t.Errorf("a1 runs %q, want the stored %s", exe, shared)
	}

	// Each attack prints LEAK:<what> when it works.
	attack := "#!/bin/sh\n" +
		"S=$1; D=$2; P=$3\n" +
		"head -c1 \"$S\" >/dev/null 2>&1 && echo LEAK:read-store-file\n" +
		"ls \"$D\" >/dev/null 2>&1 && echo LEAK:list-store\n" +
		"head -c1 /proc/$P/fd/3 >/dev/null 2>&1 && echo LEAK:read-victim-fd\n" +
		"head -c1 /proc/$P/exe >/dev/null 2>&1 && echo LEAK:read-victim-exe\n" +
		"cp /bin/true \"$S\" 2>/dev/null && echo LEAK:replace-store-file\n" +
		"( echo x >> /proc/$P/fd/3 ) 2>/dev/null && echo LEAK:write-victim-fd\n" +
		"touch \"$D/sha256-planted\" 2>/dev/null && echo LEAK:plant\n" +
		"echo attacks-done\n"
	dir := publicDir(t)
	script := filepath.Join(dir, "attack.sh")
	testkit.WriteExecutable(t, script, attack)
	args := []string{shared, store, victim}

	// Control: as root every read attack works, so the checks do see access. (The
	// replace attack is left out: it would break a1.)
	control := strings.Replace(attack, "cp /bin/true", "false", 1)
	ctl := filepath.Join(dir, "control.sh")
	testkit.WriteExecutable(t, ctl, strings.Replace(control, "touch", "false", 1))
	out, err := exec.Command(ctl, args...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "LEAK:read-store-file") || !strings.Contains(string(out), "LEAK:read-victim-fd") {
		t.Fatalf("control run as root did not reach the artifact: %v %q", err, out)
	}

	// Another tenant's workload, under its own dynamic uid.
	fn.mustStart("atk", startReq(protocol.LifecycleJob, "atk", map[string]any{"uri": "file://" + script, "argv": args}, fn.creds()))
	fn.waitLog("atk", "stdout", "attacks-done")
	for _, l := range fn.logLines("atk", "stdout") {
		if strings.HasPrefix(l, "LEAK:") {
			t.Errorf("another workload: %s", l)
		}
	}
	// A local user.
	u := testkit.NewUser(t)
	out, _ = u.Command(script, args...).CombinedOutput()
	if !strings.Contains(string(out), "attacks-done") {
		t.Fatalf("local user's attack did not run: %q", out)
	}
	if strings.Contains(string(out), "LEAK:") {
		t.Errorf("local user: %s", out)
	}
	if got := storeFiles(t, store); len(got) != 2 {
		t.Errorf("store after the attacks: %v", got)
	}

	// Shared: the first stop keeps it, the last removes it.
	fn.stop("a1", testNS)
	if _, err := os.Stat(shared); err != nil {
		t.Fatalf("artifact removed while a2 runs it: %v", err)
	}
	fn.stop("a2", testNS)
	fn.stop("s1", testNS)
	if got := storeFiles(t, store); len(got) != 0 {
		t.Errorf("store after every workload stopped: %v", got)
	}
}

// TestArtifactDiskFull: a store on a full file system refuses the deploy with an
// error that says so, nothing runs and no partial file stays; a download that fills
// the disk midway fails the same way.
func TestArtifactDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a small tmpfs as the store's file system")
	}
	fn := newFakeNode(t)
	store := t.TempDir()
	if err := syscall.Mount("tmpfs", store, "tmpfs", 0, "size=1m,mode=0700"); err != nil {
		t.Skipf("tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(store, syscall.MNT_DETACH) })
	tn := fn.startNexlet(Config{ArtifactDir: store})
	big := bytes.Repeat([]byte("#!/bin/sh\n# padding\n"), 150_000) // 3 MB
	putObjects(t, fn, map[string][]byte{"big_v1": big})

	r := fn.start("big", startReq(protocol.LifecycleJob, "big", map[string]any{"uri": "nats://artifacts/big:v1"}, fn.creds()))
	if r.code != "100" || !strings.Contains(r.errText, "no space left for the artifact") || !strings.Contains(r.errText, "needs 3000000") {
		t.Fatalf("deploy on a full store: %s %q", r.code, r.errText)
	}
	if _, err := os.Stat(filepath.Join(tn.WorkloadsDir(), "big")); !os.IsNotExist(err) {
		t.Errorf("workload dir of the refused start: %v", err)
	}
	if len(fn.procsOf("big")) != 0 {
		t.Errorf("the refused workload runs")
	}
	if got := storeFiles(t, store); len(got) != 0 {
		t.Errorf("store after the refusal: %v", got)
	}

	// The object's size said it fits, the disk fills during the download.
	err := tn.arts.write(filepath.Join(store, "sha256-x"), bytes.NewReader(big), 100, 0, nil)
	if !errors.Is(err, errNoSpace) || !strings.Contains(err.Error(), "filled up after") {
		t.Fatalf("write past the disk: %v", err)
	}
	if got := storeFiles(t, store); len(got) != 0 {
		t.Errorf("store after the failed download: %v", got)
	}
}
