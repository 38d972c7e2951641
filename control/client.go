package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// Client talks to a nexd control socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the socket at socketPath; nothing is dialled yet.
func NewClient(socketPath string) *Client {
	d := net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
	}
	return &Client{path: socketPath, hc: &http.Client{Transport: tr}}
}

// SocketPath is the path the client dials.
func (c *Client) SocketPath() string { return c.path }

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var data []byte
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode %s %s request: %w", method, path, err)
		}
		data = b
	}
	for attempt := 1; ; attempt++ {
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(data)
		}
		req, err := http.NewRequestWithContext(ctx, method, "http://nexd"+path, rd)
		if err != nil {
			return nil, err
		}
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := c.hc.Do(req)
		if err == nil {
			return resp, nil
		}
		// A read whose connection closed unanswered is asked again: the nexd that
		// accepted it ended (killed, crashed), and under socket activation the next
		// connection waits on systemd's socket for the next nexd. Only GET: anything
		// else may have taken effect.
		if method != http.MethodGet || attempt > dropRetries || !droppedUnanswered(err) {
			return nil, c.dialError(err)
		}
		select {
		case <-ctx.Done():
			return nil, c.dialError(err)
		case <-time.After(time.Duration(attempt) * dropPause):
		}
	}
}

// A GET dropped unanswered is retried dropRetries times, after attempt*dropPause.
const (
	dropRetries = 3
	dropPause   = 100 * time.Millisecond
)

// droppedUnanswered: the server closed the connection before its answer was complete.
func droppedUnanswered(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// dialError turns the usual socket failures into advice.
func (c *Client) dialError(err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("cannot reach nexd at %s (is nexd running? set --control-socket or NEX_CONTROL_SOCKET): %w", c.path, err)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("permission denied on %s: run as root or as a member of group nex: %w", c.path, err)
	}
	return fmt.Errorf("control socket %s: %w", c.path, err)
}

// call performs a request and decodes a 2xx JSON answer into out (when non-nil).
func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	_, err := c.callHeader(ctx, method, path, body, out)
	return err
}

// callHeader is call that also returns the answer's headers.
func (c *Client) callHeader(ctx context.Context, method, path string, body, out any) (http.Header, error) {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return resp.Header, readAPIError(resp)
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.Header, nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return resp.Header, fmt.Errorf("decode answer to %s %s: %w", method, path, err)
	}
	return resp.Header, nil
}

func readAPIError(resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, MaxBodyBytes))
	var eb ErrorBody
	if json.Unmarshal(data, &eb) == nil && eb.Error != "" {
		return &APIError{Status: resp.StatusCode, Message: eb.Error}
	}
	msg := string(bytes.TrimSpace(data))
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	return &APIError{Status: resp.StatusCode, Message: msg}
}

// NATSAccess asks the node how a local admin reaches its NATS system.
func (c *Client) NATSAccess(ctx context.Context) (NATSAccess, error) {
	var a NATSAccess
	return a, c.call(ctx, "GET", "/v1/nats", nil, &a)
}

// NATSAccessFor is NATSAccess with a credential valid for ttl (when the node mints one).
func (c *Client) NATSAccessFor(ctx context.Context, ttl time.Duration) (NATSAccess, error) {
	var a NATSAccess
	return a, c.call(ctx, "GET", "/v1/nats?ttl="+url.QueryEscape(ttl.String()), nil, &a)
}

// Status returns the node's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.call(ctx, "GET", "/v1/status", nil, &s)
}

// Reload asks the node to reload its config. A rejected config is not an error: the
// result has OK false and lists every reason.
func (c *Client) Reload(ctx context.Context) (ReloadResult, error) {
	var res ReloadResult
	resp, err := c.do(ctx, "POST", "/v1/reload", nil)
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusUnprocessableEntity {
		return res, readAPIError(resp)
	}
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		return res, fmt.Errorf("decode reload result: %w", err)
	}
	return res, nil
}

// Reexec asks nexd to re-execute its installed binary in place (nexctl node reexec).
func (c *Client) Reexec(ctx context.Context) error {
	return c.call(ctx, "POST", "/v1/reexec", nil, nil)
}

// Lameduck puts the node in lame duck mode; workloads stop after delay.
func (c *Client) Lameduck(ctx context.Context, delay time.Duration) (LameduckResult, error) {
	var res LameduckResult
	return res, c.call(ctx, "POST", "/v1/lameduck", LameduckRequest{Delay: Duration(delay)}, &res)
}

// Nexlets lists the node's nexlets.
func (c *Client) Nexlets(ctx context.Context) ([]Nexlet, error) {
	var ns []Nexlet
	return ns, c.call(ctx, "GET", "/v1/nexlets", nil, &ns)
}

// RestartNexlet resets and restarts the named nexlet.
func (c *Client) RestartNexlet(ctx context.Context, name string) error {
	return c.call(ctx, "POST", "/v1/nexlets/"+url.PathEscape(name)+"/restart", nil, nil)
}

// Workloads lists what the node runs. When some nexlets' workloads are missing from
// the list (HeaderPartial) it returns the list and a *PartialList.
func (c *Client) Workloads(ctx context.Context) ([]Workload, error) {
	var ws []Workload
	head, err := c.callHeader(ctx, "GET", "/v1/workloads", nil, &ws)
	if err != nil {
		return nil, err
	}
	if h := head.Get(HeaderPartial); h != "" {
		p := &PartialList{}
		if err := json.Unmarshal([]byte(h), p); err != nil {
			p.Missing = []protocol.MissingNexlet{{Name: "-", ID: "-", Reason: fmt.Sprintf("unreadable %s header %q: %v", HeaderPartial, h, err)}}
		}
		return ws, p
	}
	return ws, nil
}

func logsPath(q LogQuery, follow bool) string {
	v := url.Values{}
	if q.Nexlet != "" {
		v.Set("nexlet", q.Nexlet)
	}
	if q.Workload != "" {
		v.Set("workload", q.Workload)
	}
	if q.Lines > 0 {
		v.Set("lines", strconv.Itoa(q.Lines))
	}
	if follow {
		v.Set("follow", "1")
	}
	if q.History {
		v.Set("history", "1")
	}
	if !q.Since.IsZero() {
		v.Set("since", q.Since.UTC().Format(time.RFC3339Nano))
	}
	if len(v) == 0 {
		return "/v1/logs"
	}
	return "/v1/logs?" + v.Encode()
}

// Logs returns recent log lines.
func (c *Client) Logs(ctx context.Context, q LogQuery) ([]LogLine, error) {
	var ls []LogLine
	return ls, c.call(ctx, "GET", logsPath(q, false), nil, &ls)
}

// FollowLogs calls fn for each new log line until ctx ends (then it returns nil), the
// server closes the stream, or fn returns an error.
func (c *Client) FollowLogs(ctx context.Context, q LogQuery, fn func(LogLine) error) error {
	resp, err := c.do(ctx, "GET", logsPath(q, true), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return readAPIError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), MaxBodyBytes)
	for sc.Scan() {
		var l LogLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("decode log line %q: %w", sc.Bytes(), err)
		}
		if err := fn(l); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return fmt.Errorf("log stream: %w", err)
	}
	return nil
}

// Config returns the node's resolved, redacted config.
func (c *Client) Config(ctx context.Context) (json.RawMessage, error) {
	var raw json.RawMessage
	return raw, c.call(ctx, "GET", "/v1/config", nil, &raw)
}

func secretPath(ns, key string) string {
	p := "/v1/secrets/" + url.PathEscape(ns)
	if key != "" {
		p += "/" + url.PathEscape(key)
	}
	return p
}

// SetSecret stores a secret.
func (c *Client) SetSecret(ctx context.Context, ns, key string, value []byte) error {
	return c.call(ctx, "PUT", secretPath(ns, key), SecretPut{Value: string(value)}, nil)
}

// ListSecrets lists the names of a namespace's secrets.
func (c *Client) ListSecrets(ctx context.Context, ns string) ([]string, error) {
	var keys []string
	return keys, c.call(ctx, "GET", secretPath(ns, ""), nil, &keys)
}

// SecretExists reports whether a secret is set (its value is never returned).
func (c *Client) SecretExists(ctx context.Context, ns, key string) (bool, error) {
	err := c.call(ctx, "GET", secretPath(ns, key), nil, nil)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// DeleteSecret removes a secret.
func (c *Client) DeleteSecret(ctx context.Context, ns, key string) error {
	return c.call(ctx, "DELETE", secretPath(ns, key), nil, nil)
}

// Metrics returns the Prometheus text exposition.
func (c *Client) Metrics(ctx context.Context) ([]byte, error) {
	resp, err := c.do(ctx, "GET", "/v1/metrics", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, readAPIError(resp)
	}
	return io.ReadAll(resp.Body)
}
