// Package artifact resolves the binary of a local nexlet: a plain path, a file:// URI,
// or nats://bucket/object[:tag] fetched from a NATS object store (verified against the
// digest the store recorded) into a private directory.
package artifact

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
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
		u, err := url.Parse(uri)
		if err != nil {
			return Ref{}, fmt.Errorf("uri %q: %w", uri, err)
		}
		name := strings.TrimPrefix(u.Path, "/")
		if u.Host == "" || name == "" || strings.Contains(name, "/") {
			return Ref{}, fmt.Errorf("uri %q: want nats://bucket/object[:tag]", uri)
		}
		tag := "latest"
		if i := strings.LastIndexByte(name, ':'); i >= 0 {
			name, tag = name[:i], name[i+1:]
			if name == "" || tag == "" {
				return Ref{}, fmt.Errorf("uri %q: empty object name or tag", uri)
			}
		}
		return Ref{Scheme: "nats", Bucket: u.Host, Object: name + "_" + tag}, nil
	default:
		return Ref{}, fmt.Errorf("uri %q: want an absolute path, file:///path or nats://bucket/object[:tag]", uri)
	}
}

// Resolve returns a local executable path for ref. Object store artifacts are written
// under dir (created 0700) and named by their digest so an unchanged object is not
// fetched twice.
func Resolve(ctx context.Context, ref Ref, js jetstream.JetStream, dir string) (string, error) {
	if ref.Scheme == "file" {
		st, err := os.Stat(ref.Path)
		if err != nil {
			return "", fmt.Errorf("nexlet binary: %w", err)
		}
		if !st.Mode().IsRegular() {
			return "", fmt.Errorf("nexlet binary %s is not a regular file", ref.Path)
		}
		if st.Mode().Perm()&0o111 == 0 {
			return "", fmt.Errorf("nexlet binary %s is not executable", ref.Path)
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
