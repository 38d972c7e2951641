// Package artifact is how nexd names executables: a plain path, a file:// URI, or
// nats://bucket/object[:tag] in a NATS object store (object "<object>_<tag>", tag
// "latest" by default). The daemon resolves local nexlets with it and the native
// nexlet parses workload URIs with ParseNATS and CheckExecutable.
package artifact

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/protocol"
)

// Ref is a parsed nexlet URI.
type Ref struct {
	Scheme string // "file" or "nats"
	Path   string // file: absolute path
	Bucket string // nats: object store bucket
	Object string // nats: object name as stored (<name>_<tag>)
}

// Parse validates a nexlet URI. Plain absolute paths count as file URIs.
func Parse(uri string) (Ref, error) {
	switch {
	case uri == "":
		return Ref{}, errors.New("empty uri")
	case strings.HasPrefix(uri, "/"):
		return Ref{Scheme: "file", Path: filepath.Clean(uri)}, nil
	case strings.HasPrefix(uri, "file://"):
		p := strings.TrimPrefix(uri, "file://")
		if !strings.HasPrefix(p, "/") {
			return Ref{}, fmt.Errorf("uri %q: file:// needs an absolute path (file:///path)", uri)
		}
		return Ref{Scheme: "file", Path: filepath.Clean(p)}, nil
	case strings.HasPrefix(uri, "nats://"):
		bucket, object, err := ParseNATS(uri)
		if err != nil {
			return Ref{}, fmt.Errorf("uri %q: %w", uri, err)
		}
		return Ref{Scheme: "nats", Bucket: bucket, Object: object}, nil
	default:
		return Ref{}, fmt.Errorf("uri %q: want an absolute path, file:///path or nats://bucket/object[:tag]", uri)
	}
}

// ParseNATS splits nats://bucket/name[:tag] into the bucket and the stored object name
// "<name>_<tag>" (tag "latest" when absent).
func ParseNATS(uri string) (bucket, object string, err error) {
	rest, ok := strings.CutPrefix(uri, "nats://")
	if !ok {
		return "", "", errors.New("want nats://<bucket>/<name>[:<tag>]")
	}
	bucket, name, ok := strings.Cut(rest, "/")
	if !ok || bucket == "" || name == "" {
		return "", "", errors.New("want nats://<bucket>/<name>[:<tag>]")
	}
	if !protocol.IsToken(bucket) {
		return "", "", fmt.Errorf("bucket %q may hold only letters, digits, '-' and '_'", bucket)
	}
	tag := "latest"
	if n, t, ok := strings.Cut(name, ":"); ok {
		name, tag = n, t
	}
	if name == "" || tag == "" || strings.ContainsAny(name+tag, "/: ") {
		return "", "", errors.New("want nats://<bucket>/<name>[:<tag>]")
	}
	return bucket, name + "_" + tag, nil
}

// CheckExecutable says why path cannot be run: missing, not a regular file, or not
// executable.
func CheckExecutable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if st.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", path)
	}
	return nil
}

// Resolve returns a local executable path for ref. Object store artifacts are written
// under dir (created 0700) and named by their digest so an unchanged object is not
// fetched twice.
func Resolve(ctx context.Context, ref Ref, js jetstream.JetStream, dir string) (string, error) {
	if ref.Scheme == "file" {
		if err := CheckExecutable(ref.Path); err != nil {
			return "", fmt.Errorf("nexlet binary: %w", err)
		}
		return ref.Path, nil
	}
	if js == nil {
		return "", fmt.Errorf("nats://%s/%s: no NATS connection", ref.Bucket, ref.Object)
	}
	obs, err := js.ObjectStore(ctx, ref.Bucket)
	if err != nil {
		return "", fmt.Errorf("object store %q: %w", ref.Bucket, err)
	}
	res, err := obs.Get(ctx, ref.Object)
	if err != nil {
		return "", fmt.Errorf("object %s/%s: %w", ref.Bucket, ref.Object, err)
	}
	defer res.Close()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("artifact dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".fetch-*")
	if err != nil {
		return "", fmt.Errorf("artifact dir: %w", err)
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	// The object store reader checks the stored digest at EOF and fails on mismatch.
	if _, err := io.Copy(io.MultiWriter(tmp, h), res); err != nil {
		tmp.Close()
		return "", fmt.Errorf("fetch %s/%s: %w", ref.Bucket, ref.Object, err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	final := filepath.Join(dir, ref.Bucket+"-"+ref.Object+"-"+hex.EncodeToString(h.Sum(nil))[:16])
	if err := os.Rename(tmp.Name(), final); err != nil {
		return "", err
	}
	return final, nil
}
