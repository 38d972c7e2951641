package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/internal/names"
)

// Who besides root and group members may use the socket.
const (
	AllowNone   = "none"   // nobody else may connect (socket mode 0660)
	AllowStatus = "status" // others may GET /v1/status only (socket mode 0666)
)

// ServerOptions configure Listen.
type ServerOptions struct {
	Backend Backend
	Logger  *slog.Logger
	// AllowOthers is AllowNone (the default when empty) or AllowStatus.
	AllowOthers string
	// Group whose members get full access and which owns the socket; default "nex".
	// When the group does not exist only root has full access.
	Group string
	// ProcRoot is where peers' /proc/<pid>/status is read; default "/proc".
	ProcRoot string
	// Listener, when set, is the socket systemd created for nexd (socket activation,
	// nexd.socket): Listen serves on it instead of creating one, still applies the
	// mode and group above (the config decides who may connect), and Close leaves
	// it in place, so clients queue on it while nexd restarts.
	Listener *net.UnixListener
	// ReadTimeout bounds reading a request (default ReadTimeout); tests shorten it.
	ReadTimeout time.Duration
	// MaxConnsPerUser bounds a non-admin uid's open connections (default
	// MaxConnsPerUser).
	MaxConnsPerUser int
	// MaxConns bounds the open connections of each class together: admins, workloads
	// (WorkloadUIDs), other local users (default MaxConns); tests shrink it.
	MaxConns int
	// MaxLists bounds the workload lists answered at once (default MaxLists).
	MaxLists int
	// WorkloadUIDs is the dynamic uid range workloads run as (workload_uid_range,
	// MIN and MAX), zero when none: their connections share a bound of their own, so
	// a tenant's many workloads cannot keep other local users out.
	WorkloadUIDs [2]uint32
}

// Server serves the control API on a Unix socket.
type Server struct {
	path     string
	opts     ServerOptions
	ln       net.Listener
	lim      *limitListener // ln: counts the connections accepted and not yet closed
	inherit  bool           // the socket is systemd's: never remove it
	srv      *http.Server
	mux      *http.ServeMux
	known    *http.ServeMux // the same paths without methods, to tell 405 from 404
	groupGID uint32
	hasGroup bool
	log      *slog.Logger

	maxConns, maxPerUser int
	readTimeout          time.Duration
	lists                chan struct{} // a turn for each workload list answered now (MaxLists)

	baseCtx    context.Context
	baseCancel context.CancelFunc
	// follows ends streaming requests at Close; ordinary requests are not cancelled, so a
	// status answered while nexd stops (a restart under socket activation) completes.
	follows    context.Context
	endFollows context.CancelFunc
	closeOnce  sync.Once

	mu        sync.Mutex
	closed    bool          // Close has begun: Serve no longer starts
	serving   bool          // Serve's accept loop runs (or ran)
	serveDone chan struct{} // closed when that loop has returned
}

// DefaultGroup is the group whose members are the control socket's admins.
const DefaultGroup = "nex"

// Listen creates the socket at path (see DefaultSocketPath) and prepares the server.
func Listen(path string, opts ServerOptions) (*Server, error) {
	if opts.Backend == nil {
		return nil, errors.New("control: ServerOptions.Backend is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Group == "" {
		opts.Group = DefaultGroup
	}
	if opts.ProcRoot == "" {
		opts.ProcRoot = "/proc"
	}
	mode := fs.FileMode(0o660)
	switch opts.AllowOthers {
	case "", AllowNone:
		opts.AllowOthers = AllowNone
	case AllowStatus:
		// Others must be able to connect at all; SO_PEERCRED then limits them to status.
		mode = 0o666
	default:
		return nil, fmt.Errorf("control: allow_others %q is not one of %q, %q", opts.AllowOthers, AllowNone, AllowStatus)
	}
	s := &Server{path: path, opts: opts, log: opts.Logger}
	if g, err := user.LookupGroup(opts.Group); err == nil {
		if gid, err := strconv.ParseUint(g.Gid, 10, 32); err == nil {
			s.groupGID, s.hasGroup = uint32(gid), true
		}
	}
	gid := -1
	if s.hasGroup {
		gid = int(s.groupGID)
	}
	warn := func(msg string) { opts.Logger.Warn(msg) }
	if opts.Listener != nil {
		got := opts.Listener.Addr().String()
		if got != path {
			warn(fmt.Sprintf("control socket from systemd is %s, not the configured %s; serving on systemd's", got, path))
		}
		s.path, s.ln, s.inherit = got, opts.Listener, true
		if !strings.HasPrefix(got, "@") { // an abstract socket has no file to chmod
			if err := setOwnership(got, mode, gid, warn); err != nil {
				return nil, err
			}
		}
	} else {
		ln, err := listenUnix(path, mode, gid, warn)
		if err != nil {
			return nil, err
		}
		s.ln = ln
	}
	s.maxConns, s.maxPerUser = MaxConns, MaxConnsPerUser
	if opts.MaxConnsPerUser > 0 {
		s.maxPerUser = opts.MaxConnsPerUser
	}
	if opts.MaxConns > 0 {
		s.maxConns = opts.MaxConns
	}
	s.lim = &limitListener{Listener: s.ln, s: s, per: map[uint32]int{}}
	s.ln = s.lim
	s.serveDone = make(chan struct{})
	readTimeout := ReadTimeout
	if opts.ReadTimeout > 0 {
		readTimeout = opts.ReadTimeout
	}
	s.readTimeout = readTimeout
	maxLists := MaxLists
	if opts.MaxLists > 0 {
		maxLists = opts.MaxLists
	}
	s.lists = make(chan struct{}, maxLists)
	s.routes()
	s.baseCtx, s.baseCancel = context.WithCancel(context.Background())
	s.follows, s.endFollows = context.WithCancel(context.Background())
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: min(10*time.Second, readTimeout),
		// The whole request, body included: a client that sends a Content-Length and
		// no body is dropped instead of holding its connection.
		ReadTimeout: readTimeout,
		// Headers are read before the peer is authorized: net/http's default, 1 MiB a
		// connection, would let the uids of many workloads hold about 1 GiB.
		MaxHeaderBytes: MaxHeaderBytes,
		IdleTimeout:    time.Minute,
		BaseContext:    func(net.Listener) context.Context { return s.baseCtx },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(*peerConn); ok {
				return context.WithValue(ctx, peerKey{}, pc.peer)
			}
			return context.WithValue(ctx, peerKey{}, readPeer(c, opts.ProcRoot))
		},
		ErrorLog: slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn),
	}
	return s, nil
}

// Path is the socket path.
func (s *Server) Path() string { return s.path }

// Serve answers requests until ctx ends or Close is called; it then returns nil.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.serving = true
	s.mu.Unlock()
	defer close(s.serveDone)
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	err := s.srv.Serve(s.ln)
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed || errors.Is(err, http.ErrServerClosed) {
		return nil // Close closed the listener
	}
	return err
}

// drainWait bounds how long Close waits for the accepted connections' answers.
const drainWait = 5 * time.Second

// Close stops accepting, answers every request already accepted, ends streaming
// requests and removes the socket (unless it is systemd's).
//
// Not http.Server.Shutdown alone: it drops, unanswered, a request read from a
// connection accepted just before it began (net/http checks for shutdown after reading
// each request), and the client sees EOF. Under socket activation that is a nexctl call
// failing during `systemctl restart nexd`, although a connection still queued on
// systemd's socket is answered by the next nexd. So Close first stops the accept loop,
// turns keep-alives off (idle connections close, busy ones close after their answer)
// and waits, bounded, for every accepted connection to close; only then does it shut
// the server down.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		serving := s.serving
		s.mu.Unlock()
		s.endFollows() // ends log follows, which the drain would otherwise wait for
		err = s.lim.Listener.Close()
		if serving {
			<-s.serveDone // every connection accepted is now counted in s.lim
		}
		s.srv.SetKeepAlivesEnabled(false)
		ctx, cancel := context.WithTimeout(context.Background(), drainWait)
		defer cancel()
		if s.lim.drain(ctx) {
			_ = s.srv.Shutdown(ctx) // nothing is open: it only releases the server
		} else {
			s.log.Warn("control socket: closing connections still open after the drain", "bound", drainWait.String())
			_ = s.srv.Close()
		}
		s.baseCancel()
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
		if s.inherit {
			return // systemd's socket outlives this nexd
		}
		if rerr := os.Remove(s.path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) && err == nil {
			err = rerr
		}
	})
	return err
}

type route struct {
	method, pattern string
	public          bool // readable by others when AllowOthers is "status"
	h               func(w http.ResponseWriter, r *http.Request)
}

func (s *Server) routes() {
	rs := []route{
		{"GET", "/v1/status", true, s.handleStatus},
		{"POST", "/v1/reload", false, s.handleReload},
		{"POST", "/v1/lameduck", false, s.handleLameduck},
		{"GET", "/v1/nexlets", false, s.handleNexlets},
		{"POST", "/v1/nexlets/{name}/restart", false, s.handleRestartNexlet},
		{"GET", "/v1/workloads", false, s.handleWorkloads},
		{"GET", "/v1/logs", false, s.handleLogs},
		{"GET", "/v1/config", false, s.handleConfig},
		{"GET", "/v1/secrets/{ns}", false, s.handleSecretList},
		{"GET", "/v1/secrets/{ns}/{key}", false, s.handleSecretGet},
		{"PUT", "/v1/secrets/{ns}/{key}", false, s.handleSecretPut},
		{"DELETE", "/v1/secrets/{ns}/{key}", false, s.handleSecretDelete},
		{"GET", "/v1/metrics", false, s.handleMetrics},
		{"GET", "/v1/nats", false, s.handleNATSAccess},
		{"POST", "/v1/reexec", false, s.handleReexec},
	}
	s.mux = http.NewServeMux()
	s.known = http.NewServeMux()
	allowed := map[string][]string{}
	for _, rt := range rs {
		rt := rt
		s.mux.HandleFunc(rt.method+" "+rt.pattern, func(w http.ResponseWriter, r *http.Request) {
			if !s.authorize(w, r, rt.public) {
				return
			}
			rt.h(w, r)
		})
		allowed[rt.pattern] = append(allowed[rt.pattern], rt.method)
	}
	for p, methods := range allowed {
		allow := strings.Join(methods, ", ")
		s.known.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed on %s (allowed: %s)", r.Method, r.URL.Path, allow))
		})
	}
}

// versionPrefix is compiled where an unknown path needs it, not by the package's init:
// every package's init runs in nexd and in the native nexlet alike, used or not.
const versionPrefix = `^/(v[0-9]+)(/|$)`

// ServeHTTP routes a request, answering unknown paths, methods and versions in JSON.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if _, pattern := s.mux.Handler(r); pattern != "" {
		s.mux.ServeHTTP(w, r)
		return
	}
	if _, pattern := s.known.Handler(r); pattern != "" {
		s.known.ServeHTTP(w, r)
		return
	}
	if m := regexp.MustCompile(versionPrefix).FindStringSubmatch(r.URL.Path); m != nil && m[1] != APIVersion {
		writeError(w, http.StatusNotFound, fmt.Sprintf("API version %s is not supported; this nexd speaks %s", m[1], APIVersion))
		return
	}
	writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
}

// authorize admits root and members of the nex group everywhere, others only on public
// routes when AllowOthers is "status".
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, public bool) bool {
	p, ok := PeerFromContext(r.Context())
	if !ok || p.Err != nil {
		reason := "peer credentials unavailable"
		if ok {
			reason = p.Err.Error()
		}
		s.log.Warn("control request refused", "path", r.URL.Path, "reason", reason)
		writeError(w, http.StatusForbidden, "permission denied: "+reason)
		return false
	}
	if s.isAdmin(p) {
		return true
	}
	if public && s.opts.AllowOthers == AllowStatus {
		return true
	}
	s.log.Info("control request refused", "path", r.URL.Path, "uid", p.UID, "pid", p.PID)
	writeError(w, http.StatusForbidden, fmt.Sprintf("permission denied: uid %d is neither root nor a member of group %s", p.UID, s.opts.Group))
	return false
}

// isWorkloadUID says whether uid is in the workloads' dynamic uid range.
func (s *Server) isWorkloadUID(uid uint32) bool {
	r := s.opts.WorkloadUIDs
	return r[1] != 0 && uid >= r[0] && uid <= r[1]
}

// isAdmin: root, nexd's own uid (without root, as under make run, the user who started
// it, when there may be no group nex at all) and members of the group.
func (s *Server) isAdmin(p Peer) bool {
	return p.UID == 0 || int(p.UID) == os.Geteuid() || (s.hasGroup && p.inGroup(s.groupGID))
}

// deadlineWriter bounds each write of an answer to a client that must not hold it
// unread (a non-admin's connection does so for all its writes): a client that reads
// slowly is served, one that stops reading for the bound is cut off.
type deadlineWriter struct {
	http.ResponseWriter
	rc    *http.ResponseController
	bound time.Duration
}

func newDeadlineWriter(w http.ResponseWriter, bound time.Duration) *deadlineWriter {
	return &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w), bound: bound}
}

// deadlineChunk: net/http writes through a 4 KiB buffer, so the deadline set before a
// chunk bounds that chunk's writes to the connection.
const deadlineChunk = 64 << 10

func (d *deadlineWriter) Write(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		_ = d.rc.SetWriteDeadline(time.Now().Add(d.bound))
		k, err := d.ResponseWriter.Write(b[:min(len(b), deadlineChunk)])
		n += k
		if err != nil {
			return n, err
		}
		b = b[k:]
	}
	return n, nil
}

// done writes out what is buffered, within the bound, and lifts the deadline for the
// connection's next request.
func (d *deadlineWriter) done() {
	_ = d.rc.SetWriteDeadline(time.Now().Add(d.bound))
	_ = d.rc.Flush()
	_ = d.rc.SetWriteDeadline(time.Time{})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, ErrorBody{Error: msg, Code: status})
}

// backendError maps a Backend error to a status: the sentinel errors choose 404/400/409,
// anything else is a 500 whose text is still shown, since only local operators see it.
func (s *Server) backendError(w http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrNotFound):
		status = http.StatusNotFound
	case errors.Is(err, ErrInvalid):
		status = http.StatusBadRequest
	case errors.Is(err, ErrConflict):
		status = http.StatusConflict
	case errors.Is(err, context.Canceled):
		status = http.StatusServiceUnavailable
	}
	if status == http.StatusInternalServerError {
		s.log.Error("control request failed", "path", r.URL.Path, "err", err)
	}
	writeError(w, status, err.Error())
}

// decodeBody reads one JSON object of at most MaxBodyBytes into v, answering 413 or a
// 400 that names the problem; it reports whether the handler should go on.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	body := http.MaxBytesReader(w, r.Body, MaxBodyBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			var mbe *http.MaxBytesError
			if errors.As(terr, &mbe) {
				err = terr
			} else {
				writeError(w, http.StatusBadRequest, "malformed JSON request body: unexpected data after the JSON object")
				return false
			}
		} else {
			return true
		}
	}
	var (
		mbe *http.MaxBytesError
		se  *json.SyntaxError
		ute *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &mbe):
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", mbe.Limit))
	case errors.Is(err, io.EOF):
		writeError(w, http.StatusBadRequest, "request body is empty; expected a JSON object")
	case errors.As(err, &se):
		writeError(w, http.StatusBadRequest, fmt.Sprintf("malformed JSON request body at byte %d: %v", se.Offset, se))
	case errors.As(err, &ute):
		writeError(w, http.StatusBadRequest, fmt.Sprintf("request body field %q: expected %s, got JSON %s", ute.Field, ute.Type, ute.Value))
	case errors.Is(err, io.ErrUnexpectedEOF):
		writeError(w, http.StatusBadRequest, "malformed JSON request body: truncated")
	default:
		writeError(w, http.StatusBadRequest, "invalid request body: "+err.Error())
	}
	return false
}

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	st, err := s.opts.Backend.Status(r.Context())
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	if p, ok := PeerFromContext(r.Context()); !ok || p.Err != nil || !s.isAdmin(p) {
		// Any local user may ask (control_allow_others = status): counts and health,
		// not the tenants' workloads (TestAttackPublicStatusShowsNoWorkloads).
		st = st.PublicView()
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) handleReload(w http.ResponseWriter, r *http.Request) {
	res, err := s.opts.Backend.Reload(r.Context())
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	status := http.StatusOK
	if !res.OK {
		// The body still carries every error, so scripts can read both.
		status = http.StatusUnprocessableEntity
	}
	writeJSON(w, status, res)
}

func (s *Server) handleReexec(w http.ResponseWriter, r *http.Request) {
	if err := s.opts.Backend.Reexec(r.Context()); err != nil {
		s.backendError(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"status": "re-executing"})
}

func (s *Server) handleLameduck(w http.ResponseWriter, r *http.Request) {
	var req LameduckRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if req.Delay < 0 {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("delay %s must not be negative", req.Delay.Std()))
		return
	}
	res, err := s.opts.Backend.Lameduck(r.Context(), req.Delay.Std())
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) handleNexlets(w http.ResponseWriter, r *http.Request) {
	ns, err := s.opts.Backend.Nexlets(r.Context())
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	if ns == nil {
		ns = []Nexlet{}
	}
	writeJSON(w, http.StatusOK, ns)
}

func (s *Server) handleRestartNexlet(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := s.opts.Backend.RestartNexlet(r.Context(), name); err != nil {
		s.backendError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"restarted": name})
}

func (s *Server) handleWorkloads(w http.ResponseWriter, r *http.Request) {
	// A list asks every nexlet and holds its rows until written: the lists answered at
	// once are bounded, the others wait their turn (TestAdminListsWaitTheirTurn).
	select {
	case s.lists <- struct{}{}:
	default:
		s.log.Debug("control: a workload list waits its turn", "lists_at_once", cap(s.lists))
		select {
		case s.lists <- struct{}{}:
		case <-r.Context().Done():
			writeError(w, http.StatusServiceUnavailable, "the workload list waited for its turn until the request ended")
			return
		}
	}
	defer func() { <-s.lists }()
	ws, err := s.opts.Backend.Workloads(r.Context())
	// An admin's writes have no deadline (a log follow waits on its reader); a client
	// that stops reading this answer must not keep the turn.
	dw := newDeadlineWriter(w, s.readTimeout)
	defer dw.done()
	w = dw
	var partial *PartialList
	if errors.As(err, &partial) {
		b, _ := json.Marshal(partial)
		w.Header().Set(HeaderPartial, string(b))
	} else if err != nil {
		s.backendError(w, r, err)
		return
	}
	if ws == nil {
		ws = []Workload{}
	}
	writeJSON(w, http.StatusOK, ws)
}

func (s *Server) handleLogs(w http.ResponseWriter, r *http.Request) {
	qv := r.URL.Query()
	q := LogQuery{Nexlet: qv.Get("nexlet"), Workload: qv.Get("workload")}
	if q.Nexlet != "" && q.Workload != "" {
		writeError(w, http.StatusBadRequest, "query: nexlet and workload are mutually exclusive")
		return
	}
	switch f := qv.Get("follow"); f {
	case "", "0", "false":
	case "1", "true":
		q.Follow = true
	default:
		writeError(w, http.StatusBadRequest, fmt.Sprintf("query: follow=%q is not 0, 1, true or false", f))
		return
	}
	if l := qv.Get("lines"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query: lines=%q is not a non-negative integer", l))
			return
		}
		q.Lines = n
	}
	switch h := qv.Get("history"); h {
	case "", "0", "false":
	case "1", "true":
		q.History = true
	default:
		writeError(w, http.StatusBadRequest, fmt.Sprintf("query: history=%q is not 0, 1, true or false", h))
		return
	}
	if since := qv.Get("since"); since != "" {
		t, err := time.Parse(time.RFC3339Nano, since)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("query: since=%q is not an RFC 3339 time", since))
			return
		}
		q.Since = t
	}
	if q.History && (q.Workload == "" || q.Follow) {
		writeError(w, http.StatusBadRequest, "query: history needs workload and no follow")
		return
	}
	if !q.Follow {
		lines, err := s.opts.Backend.Logs(r.Context(), q)
		if err != nil {
			s.backendError(w, r, err)
			return
		}
		if lines == nil {
			lines = []LogLine{}
		}
		writeJSON(w, http.StatusOK, lines)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(s.follows, cancel)()
	ch, err := s.opts.Backend.FollowLogs(ctx, q)
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	enc := json.NewEncoder(w)
	for {
		select {
		case <-ctx.Done():
			return
		case l, ok := <-ch:
			if !ok {
				return
			}
			if err := enc.Encode(l); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

// MaxCredsTTL bounds the lifetime of an admin credential the socket hands out.
const MaxCredsTTL = 366 * 24 * time.Hour

func (s *Server) handleNATSAccess(w http.ResponseWriter, r *http.Request) {
	var ttl time.Duration
	if v := r.URL.Query().Get("ttl"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > MaxCredsTTL {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("ttl %q: want a duration between 1s and %s", v, MaxCredsTTL))
			return
		}
		ttl = d
	}
	acc, err := s.opts.Backend.NATSAccess(r.Context(), ttl)
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, acc)
}

func (s *Server) handleConfig(w http.ResponseWriter, r *http.Request) {
	cfg, err := s.opts.Backend.Config(r.Context())
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(cfg)
}

// validSecretName: 1-255 letters, digits, '_', '.' or '-', not starting with '.' or '-'.
func validSecretName(s string) bool {
	return names.Valid(s, names.Alnum|names.Underscore, names.Alnum|names.Underscore|names.Dot|names.Dash, 255)
}

// secretArgs validates the path's namespace (and key) so a store keyed by file names
// can never be walked out of its directory.
func (s *Server) secretArgs(w http.ResponseWriter, r *http.Request, withKey bool) (SecretStore, string, string, bool) {
	st := s.opts.Backend.Secrets()
	if st == nil {
		writeError(w, http.StatusNotImplemented, "this node has no secret store configured")
		return nil, "", "", false
	}
	ns, key := r.PathValue("ns"), r.PathValue("key")
	if !validSecretName(ns) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("namespace %q: must be letters, digits, '_', '.', '-' and not start with '.' or '-'", ns))
		return nil, "", "", false
	}
	if withKey && !validSecretName(key) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("secret key %q: must be letters, digits, '_', '.', '-' and not start with '.' or '-'", key))
		return nil, "", "", false
	}
	return st, ns, key, true
}

func (s *Server) handleSecretList(w http.ResponseWriter, r *http.Request) {
	st, ns, _, ok := s.secretArgs(w, r, false)
	if !ok {
		return
	}
	keys, err := st.List(ns)
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	if keys == nil {
		keys = []string{}
	}
	writeJSON(w, http.StatusOK, keys)
}

func (s *Server) handleSecretGet(w http.ResponseWriter, r *http.Request) {
	st, ns, key, ok := s.secretArgs(w, r, true)
	if !ok {
		return
	}
	keys, err := st.List(ns)
	if err != nil {
		s.backendError(w, r, err)
		return
	}
	for _, k := range keys {
		if k == key {
			writeJSON(w, http.StatusOK, SecretInfo{Namespace: ns, Key: key})
			return
		}
	}
	writeError(w, http.StatusNotFound, fmt.Sprintf("secret %s/%s not found", ns, key))
}

func (s *Server) handleSecretPut(w http.ResponseWriter, r *http.Request) {
	st, ns, key, ok := s.secretArgs(w, r, true)
	if !ok {
		return
	}
	var req SecretPut
	if !decodeBody(w, r, &req) {
		return
	}
	if err := st.Set(ns, key, []byte(req.Value)); err != nil {
		s.backendError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, SecretInfo{Namespace: ns, Key: key})
}

func (s *Server) handleSecretDelete(w http.ResponseWriter, r *http.Request) {
	st, ns, key, ok := s.secretArgs(w, r, true)
	if !ok {
		return
	}
	if err := st.Delete(ns, key); err != nil {
		s.backendError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, SecretInfo{Namespace: ns, Key: key})
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	h := s.opts.Backend.Metrics()
	if h == nil {
		writeError(w, http.StatusNotFound, "metrics are not enabled on this node")
		return
	}
	h.ServeHTTP(w, r)
}
