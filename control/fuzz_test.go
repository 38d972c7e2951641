package control

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// FuzzRequests sends arbitrary requests (method, path, query, body) to every route of
// the control API, as an admin: no panic, an answer within a bound, every error a JSON
// ErrorBody whose code is the status, every 400 naming where the problem is (the body,
// a query parameter, a path argument), and a secret set only under names that pass
// validation.
func FuzzRequests(f *testing.F) {
	b := newTestBackend()
	b.follow = make(chan LogLine)
	close(b.follow) // a follow ends at once
	s, err := Listen(filepath.Join(f.TempDir(), "nexd.sock"), ServerOptions{Backend: b})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = s.Close() })
	methods := []string{"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"}
	for _, c := range []struct {
		m                 byte
		path, query, body string
	}{
		{0, "/v1/status", "", ""},
		{1, "/v1/lameduck", "", `{"delay":"2m"}`},
		{1, "/v1/lameduck", "", `{"delay":120000000000}`},
		{1, "/v1/lameduck", "", `{"delay":"-1m"}`},
		{1, "/v1/reload", "", ""},
		{1, "/v1/nexlets/native/restart", "", ""},
		{0, "/v1/logs", "nexlet=native&lines=10&since=2024-01-02T03:04:05Z", ""},
		{0, "/v1/logs", "workload=W1&history=1", ""},
		{0, "/v1/logs", "follow=1", ""},
		{0, "/v1/nats", "ttl=1h", ""},
		{2, "/v1/secrets/default/API_KEY", "", `{"value":"s3cret"}`},
		{0, "/v1/secrets/default", "", ""},
		{3, "/v1/secrets/default/API_KEY", "", ""},
		{2, "/v1/secrets/../etc", "", `{"value":"x"}`},
		{0, "/v2/status", "", ""},
		{4, "/v1/status", "", ""},
	} {
		f.Add(c.m, c.path, c.query, []byte(c.body))
	}
	f.Fuzz(func(t *testing.T, m byte, path, query string, body []byte) {
		method := methods[int(m)%len(methods)]
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		u := &url.URL{Path: path, RawQuery: query}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ctx = context.WithValue(ctx, peerKey{}, Peer{UID: 0, PID: 1})
		r := (&http.Request{Method: method, URL: u, Header: http.Header{}, Body: http.NoBody, Host: "nexd", RequestURI: u.RequestURI()}).WithContext(ctx)
		if len(body) > 0 {
			r.Body, r.ContentLength = readCloser{bytes.NewReader(body)}, int64(len(body))
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if ctx.Err() != nil {
			t.Fatalf("%s %s?%s took over 10 s", method, path, query)
		}
		status := w.Code
		if status < 400 {
			if method == "PUT" && status == http.StatusOK {
				var si SecretInfo
				if err := json.Unmarshal(w.Body.Bytes(), &si); err != nil {
					t.Fatalf("PUT %s answered %q: %v", path, w.Body.Bytes(), err)
				}
				if !validSecretName(si.Namespace) || !validSecretName(si.Key) {
					t.Fatalf("PUT %s set a secret under %q/%q", path, si.Namespace, si.Key)
				}
				keys, _ := b.List(si.Namespace)
				if !slices.Contains(keys, si.Key) {
					t.Fatalf("PUT %s answered 200 but %q/%q is not listed", path, si.Namespace, si.Key)
				}
			}
			return
		}
		if ct := w.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%s %s?%s: %d with content type %q", method, path, query, status, ct)
		}
		var eb ErrorBody
		if err := json.Unmarshal(w.Body.Bytes(), &eb); err != nil || eb.Code != status || eb.Error == "" {
			t.Fatalf("%s %s?%s: %d with body %q (%v), not an ErrorBody", method, path, query, status, w.Body.Bytes(), err)
		}
		if status == http.StatusInternalServerError {
			t.Fatalf("%s %s?%s: 500 %q from a backend that fails nothing", method, path, query, eb.Error)
		}
		if status == http.StatusBadRequest && !namesAPlace(eb.Error) {
			t.Fatalf("%s %s?%s: 400 %q names no place", method, path, query, eb.Error)
		}
	})
}

// namesAPlace says whether a 400's text says where the problem is.
func namesAPlace(msg string) bool {
	for _, p := range []string{"request body", "query: ", "namespace ", "secret key ", "ttl ", "delay "} {
		if strings.HasPrefix(msg, p) || strings.Contains(msg, " "+p) || strings.HasPrefix(msg, "malformed JSON "+p) || strings.HasPrefix(msg, "invalid "+p) {
			return true
		}
	}
	return false
}

type readCloser struct{ *bytes.Reader }

func (readCloser) Close() error { return nil }
