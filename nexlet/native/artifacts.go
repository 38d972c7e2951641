package native

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/protocol"
)

// artifactStore keeps nats:// artifacts on disk, one file per content digest and
// namespace (sha256-<hex>-ns-<hash of the namespace>, see path), so two workloads of one
// artifact in a namespace share one copy and a download
// never lands in the runtime directory's tmpfs. The directory is the nexlet's own
// (0700, below the state directory, which is 0700 too): no workload user and no local
// user can reach it by path. Workloads get their artifact as an open file instead (see
// execArtifact). Which artifacts are in use is on disk, not in memory: each workload's
// directory holds a symlink "artifact" to its store file, so a restarted nexlet still
// knows them; a store file no link names is removed.
type artifactStore struct {
	dir  string // the store
	wdir string // workloads/<id>/artifact links mark what is in use
	mu   sync.Mutex
}

// artifactLink is the name, in a workload's directory, of the link to its artifact.
const artifactLink = "artifact"

// partPrefix names downloads in progress in the store.
const partPrefix = ".part-"

func newArtifactStore(dir, wdir string) (*artifactStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("artifact store: %w", err)
	}
	// Whatever made it before: only the nexlet may enter.
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("artifact store: %w", err)
	}
	s := &artifactStore{dir: dir, wdir: wdir}
	s.sweep(true)
	return s, nil
}

// path is the store file of content sum deployed in namespace ns. Copies are shared
// within a namespace only: the digest comes from the object's metadata, which whoever
// may write a bucket can set to anything, so a store shared across namespaces would
// hand tenant A the copy of tenant B's artifact once A claims its digest (A's own bytes
// are never downloaded and checked). The namespace is hashed into the name so that any
// namespace makes one plain file name.
func (s *artifactStore) path(ns, sum string) string {
	h := sha256.Sum256([]byte(ns))
	return filepath.Join(s.dir, "sha256-"+sum+"-ns-"+hex.EncodeToString(h[:16]))
}

// emptySHA256 is the digest of no bytes.
const emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// errNoSpace marks a deploy refused because the store's file system is full.
var errNoSpace = errors.New("no space left for the artifact")

// fetch puts the object into the store (unless a copy with its digest is there for
// namespace ns) and links it from the workload directory wdir. It returns the store path and the
// object's SHA-256 in hex. The size cap is checked from the object's info before the
// download and again while reading.
func (s *artifactStore) fetch(ctx context.Context, obs jetstream.ObjectStore, ns string, art artifact, wdir string, maxSize int64, report func(protocol.Progress)) (string, string, error) {
	info, err := obs.GetInfo(ctx, art.object)
	if err != nil {
		return "", "", fmt.Errorf("object %q in bucket %q: %w", art.object, art.bucket, err)
	}
	if maxSize > 0 && int64(info.Size) > maxSize {
		return "", "", fmt.Errorf("object %q in bucket %q is %d bytes, over the node's artifact_max_size of %d", art.object, art.bucket, info.Size, maxSize)
	}
	sum, err := objectDigest(info.Digest)
	if err != nil {
		return "", "", fmt.Errorf("object %q in bucket %q: %w", art.object, art.bucket, err)
	}
	if info.Size == 0 && sum != emptySHA256 {
		// The client library checks the digest of what it read only when there is
		// something to read.
		return "", "", fmt.Errorf("object %q in bucket %q is empty but claims digest %s", art.object, art.bucket, info.Digest)
	}
	p := s.path(ns, sum)
	// The link first, under the lock a sweep takes: from here on no sweep removes the
	// file, whether it is there already or arrives below.
	s.mu.Lock()
	err = os.Symlink(p, filepath.Join(wdir, artifactLink))
	_, statErr := os.Stat(p)
	s.mu.Unlock()
	if err != nil {
		return "", "", fmt.Errorf("artifact link: %w", err)
	}
	if statErr == nil {
		return p, sum, nil
	}
	if free, ok := s.free(); ok && int64(info.Size) > free {
		return "", "", fmt.Errorf("%w: the artifact store %s has %d bytes free, object %q in bucket %q needs %d",
			errNoSpace, s.dir, free, art.object, art.bucket, info.Size)
	}
	res, err := obs.Get(ctx, art.object)
	if err != nil {
		return "", "", fmt.Errorf("object %q in bucket %q: %w", art.object, art.bucket, err)
	}
	defer res.Close()
	if got, err := res.Info(); err != nil || got.Digest != info.Digest {
		return "", "", fmt.Errorf("object %q in bucket %q changed while it was fetched; deploy again", art.object, art.bucket)
	}
	total := int64(info.Size)
	text := "downloading nats://" + art.bucket + "/" + art.object
	report(protocol.Progress{Text: text, Total: total})
	cw := func(done int64) { report(protocol.Progress{Text: text, Done: done, Total: total}) }
	if err := s.write(p, res, total, maxSize, cw); err != nil {
		return "", "", fmt.Errorf("object %q in bucket %q: %w", art.object, art.bucket, err)
	}
	return p, sum, nil
}

// write copies r (which checks the object's digest at its end) into a new file in the
// store and renames it to p once complete: a reader of p never sees a partial file.
// progress, when set, hears the bytes written so far.
func (s *artifactStore) write(p string, r io.Reader, size, maxSize int64, progress func(int64)) error {
	f, err := os.CreateTemp(s.dir, partPrefix)
	if err != nil {
		return s.spaceErr(err, 0, size)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if maxSize > 0 {
		r = io.LimitReader(r, maxSize+1)
	}
	var w io.Writer = f
	if progress != nil {
		w = &countWriter{w: f, fn: progress}
	}
	n, err := io.Copy(w, r)
	if err != nil {
		return s.spaceErr(err, n, size)
	}
	if maxSize > 0 && n > maxSize {
		return fmt.Errorf("over the node's artifact_max_size of %d bytes", maxSize)
	}
	if err := f.Sync(); err != nil {
		return s.spaceErr(err, n, size)
	}
	// Executable and readable by every uid that holds it open (a workload gets it as
	// an open file; scripts are read by their interpreter), writable by nobody: the
	// store directory, not the mode, keeps others from it.
	if err := f.Chmod(0o555); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return s.spaceErr(err, n, size)
	}
	if err := os.Rename(tmp, p); err != nil {
		return err
	}
	ok = true
	return nil
}

// spaceErr names a full file system as such, with how far the download got.
func (s *artifactStore) spaceErr(err error, written, size int64) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: the artifact store %s filled up after %d of %d bytes: %w", errNoSpace, s.dir, written, size, err)
	}
	return err
}

// free is what the store's file system has for the nexlet, when it can be known.
func (s *artifactStore) free() (int64, bool) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.dir, &st); err != nil {
		return 0, false
	}
	return int64(st.Bavail) * int64(st.Bsize), true
}

// sweep removes every store file no workload directory links to; at start-up also the
// downloads a previous nexlet left unfinished.
func (s *artifactStore) sweep(startup bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	used := map[string]bool{}
	links, _ := filepath.Glob(filepath.Join(s.wdir, "*", artifactLink))
	for _, l := range links {
		if t, err := os.Readlink(l); err == nil {
			used[filepath.Base(t)] = true
		}
	}
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, partPrefix) {
			if startup {
				os.Remove(filepath.Join(s.dir, name))
			}
			continue
		}
		if !used[name] {
			os.Remove(filepath.Join(s.dir, name))
		}
	}
}

// objectDigest turns an object store digest ("SHA-256=<base64url>") into hex.
func objectDigest(d string) (string, error) {
	v, ok := strings.CutPrefix(d, "SHA-256=")
	if !ok {
		return "", fmt.Errorf("digest %q is not SHA-256", d)
	}
	b, err := base64.URLEncoding.DecodeString(v)
	if err != nil || len(b) != 32 {
		return "", fmt.Errorf("digest %q is not SHA-256", d)
	}
	return hex.EncodeToString(b), nil
}

// fetchArtifact connects with creds, the fetch user the node minted for the workload
// or else the workload's own (either reads only what its namespace may), and fetches
// the artifact into the store.
//
// A request the server refuses this user (a bucket outside its namespace's grant)
// gets no answer, only a permissions violation on the connection, which nats.go hands
// to the error handler alone: the fetch then waited out its whole bound (minutes) and
// reported a deadline. The connection is the fetch's own, so a violation on it of
// something the fetch needs ends the fetch at once with that error
// (TestArtifactFetchRefusedPromptly); one it can do without (the client library's
// delete of its spent consumer, which the workload's own credentials may not allow)
// does not (TestArtifactFetchSparesUnneededRefusal).
func (s *artifactStore) fetchArtifact(ctx context.Context, creds protocol.NatsConnectionData, ns string, art artifact, wdir string, maxSize int64, report func(protocol.Progress)) (string, string, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	refused := nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		if errors.Is(err, nats.ErrPermissionViolation) && fetchNeeds(err) {
			cancel(fmt.Errorf("the NATS server refused the artifact's reader: %w", err))
		}
	})
	nc, err := nexlet.Connect(creds, "nexlet-native-artifact", refused)
	if err != nil {
		return "", "", fmt.Errorf("with the workload's artifact credentials: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return "", "", fmt.Errorf("jetstream: %w", err)
	}
	// cause is the refusal, when the server refused a request, rather than what the
	// cancelled request made of it.
	cause := func(err error) error {
		if c := context.Cause(ctx); c != nil && ctx.Err() != nil && !errors.Is(c, ctx.Err()) {
			return c
		}
		return err
	}
	obs, err := js.ObjectStore(ctx, art.bucket)
	if err != nil {
		return "", "", fmt.Errorf("object store bucket %q: %w", art.bucket, cause(err))
	}
	path, sum, err := s.fetch(ctx, obs, ns, art, wdir, maxSize, report)
	if err != nil {
		return "", "", cause(err)
	}
	return path, sum, nil
}

// fetchNeeds reports whether the permissions violation err refuses something an
// object fetch cannot do without: a subscription (its inbox, the chunks' delivery), the
// bucket's stream info, the object's meta lookup (direct or message get), the
// chunks' consumer and its flow-control replies. Anything else (the consumer's delete
// once the last chunk is in: the server drops the ephemeral consumer once it is idle)
// is not. A violation whose subject cannot be read counts as needed.
func fetchNeeds(err error) bool {
	_, what, ok := strings.Cut(err.Error(), "Permissions Violation for ")
	if !ok {
		return true
	}
	kind, rest, _ := strings.Cut(what, " to \"")
	subject, _, ok := strings.Cut(rest, "\"")
	if !ok {
		return true
	}
	if kind != "Publish" {
		return true // Subscription
	}
	if strings.HasPrefix(subject, "$JS.FC.") {
		return true
	}
	// $JS.API.<op> or, in a JetStream domain, $JS.<domain>.API.<op>.
	rest, ok = strings.CutPrefix(subject, "$JS.")
	if !ok {
		return false
	}
	if !strings.HasPrefix(rest, "API.") {
		_, rest, _ = strings.Cut(rest, ".") // the domain
	}
	op, ok := strings.CutPrefix(rest, "API.")
	if !ok {
		return false
	}
	for _, need := range []string{"STREAM.INFO.", "STREAM.MSG.GET.", "DIRECT.GET.", "CONSUMER.CREATE."} {
		if strings.HasPrefix(op, need) {
			return true
		}
	}
	return false
}

// artifactFD is the descriptor a workload's artifact has in the workload.
const artifactFD = 3

// execArtifact makes cmd run the stored artifact at path from a descriptor the nexlet
// opens, since the workload's user cannot reach the store by path: the file is the
// workload's fd 3 (read-only) and cmd execs /proc/self/fd/3, which the kernel resolves
// to the open file for the process itself whatever its uid. A script's interpreter is
// handed that path and opens it again, so #! scripts work too (their $0 is
// /proc/self/fd/3). The caller closes the returned file once cmd started.
func execArtifact(cmd *exec.Cmd, path, argv0 string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	cmd.ExtraFiles = []*os.File{f}
	cmd.Path = "/proc/self/fd/" + strconv.Itoa(artifactFD)
	cmd.Args[0] = argv0
	return f, nil
}
