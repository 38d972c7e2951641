package artifact

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testnats"
)

func TestParse(t *testing.T) {
	tests := []struct {
		uri  string
		want Ref
		err  string
	}{
		{uri: "/usr/bin/x", want: Ref{Scheme: "file", Path: "/usr/bin/x"}},
		{uri: "file:///opt/n/agent", want: Ref{Scheme: "file", Path: "/opt/n/agent"}},
		{uri: "nats://bins/echo", want: Ref{Scheme: "nats", Bucket: "bins", Object: "echo_latest"}},
		{uri: "nats://bins/echo:v2", want: Ref{Scheme: "nats", Bucket: "bins", Object: "echo_v2"}},
		{uri: "", err: "empty uri"},
		{uri: "relative/path", err: "want an absolute path"},
		{uri: "file://rel", err: "absolute path"},
		{uri: "nats://bins", err: "want nats://<bucket>/<name>"},
		{uri: "nats://bins/a/b", err: "want nats://<bucket>/<name>"},
		{uri: "nats://b.x/a", err: "may hold only letters"},
		{uri: "oci://x/y", err: "want an absolute path"},
	}
	for _, tc := range tests {
		got, err := Parse(tc.uri)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Parse(%q) err = %v, want %q", tc.uri, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", tc.uri, got, err, tc.want)
		}
	}
}

func TestResolveFile(t *testing.T) {
	dir := t.TempDir()
	exe := dir + "/ok"
	os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755)
	noexec := dir + "/noexec"
	os.WriteFile(noexec, []byte("x"), 0o644)
	ctx := context.Background()
	if p, err := Resolve(ctx, Ref{Scheme: "file", Path: exe}, nil, ""); err != nil || p != exe {
		t.Fatalf("Resolve = %q, %v", p, err)
	}
	for path, want := range map[string]string{dir + "/missing": "no such file", noexec: "not executable", dir: "not a regular file"} {
		if _, err := Resolve(ctx, Ref{Scheme: "file", Path: path}, nil, ""); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Resolve(%s) err = %v, want %q", path, err, want)
		}
	}
}

func TestResolveObjectStore(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: "bins"})
	if err != nil {
		t.Fatal(err)
	}
	body := []byte("#!/bin/sh\necho hi\n")
	if _, err := obs.PutBytes(ctx, "echo_v1", body); err != nil {
		t.Fatal(err)
	}
	ref, _ := Parse("nats://bins/echo:v1")
	dir := t.TempDir() + "/fetched"
	p, err := Resolve(ctx, ref, js, dir)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	if !bytes.Equal(got, body) || st.Mode().Perm() != 0o755 {
		t.Fatalf("fetched %q mode %v", got, st.Mode())
	}
	dst, _ := os.Stat(dir)
	if dst.Mode().Perm() != 0o700 {
		t.Errorf("artifact dir mode %v, want 0700", dst.Mode().Perm())
	}
	if _, err := Resolve(ctx, Ref{Scheme: "nats", Bucket: "bins", Object: "nope_latest"}, js, dir); err == nil || !strings.Contains(err.Error(), "bins/nope_latest") {
		t.Errorf("missing object err = %v", err)
	}
	if _, err := Resolve(ctx, Ref{Scheme: "nats", Bucket: "nobucket", Object: "x_latest"}, js, dir); err == nil || !strings.Contains(err.Error(), "nobucket") {
		t.Errorf("missing bucket err = %v", err)
	}
}
