package nexlet

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/internal/stopmemo"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// ErrorCode is the micro error code every agent endpoint uses, as upstream's SDK does.
const ErrorCode = "100"

// BadRequestCode is the code of an answer to a request refused for its content
// (BadRequest): the code a node answers a deploy it refuses for its content with, so a
// client hears one code for a bad request whether the node or its nexlet found the
// fault. Upstream's nodes relay a nexlet's answer as it is and upstream's clients take
// any code as an error (models.NexError), 400 from a node's own checks already.
const BadRequestCode = "400"

// badRequest marks an error as the request's fault (BadRequest).
type badRequest struct{ error }

func (e badRequest) Unwrap() error { return e.error }

// BadRequest marks err as a refusal of the request for its content (a field of the
// start request the nexlet cannot run as given): the runner answers it with
// BadRequestCode instead of ErrorCode, with err's text, which names the field.
func BadRequest(err error) error {
	if err == nil {
		return nil
	}
	return badRequest{err}
}

// Default timings.
const (
	DefaultHeartbeatInterval = 10 * time.Second
	DefaultRegisterTimeout   = time.Minute
	// DefaultShutdownWait bounds how long Shutdown waits for requests in flight and the
	// replay to finish.
	DefaultShutdownWait = 30 * time.Second
)

// maxInFlight bounds the slow requests (start, stop, lameduck) handled at once; more
// wait in their subscription, as NATS buffers them, instead of piling up goroutines.
const maxInFlight = 64

// Runner connects an Agent to its node over NATS.
type Runner struct {
	ctx     context.Context
	nodeID  string
	agent   Agent
	log     *slog.Logger
	hbEvery time.Duration
	regWait time.Duration
	regKey  nkeys.KeyPair // signs REGISTER (nil: unsigned, as upstream's SDK)
	sdWait  time.Duration
	patient bool    // WithPatientStart
	dial    *Dial   // WithRegistrationDial
	sock    *Socket // WithConnectSocket
	// local is the channel to the node that spawned this nexlet (WithLocalChannel),
	// or to the node that adopted it (its socket, sockPath); localDone is closed when
	// its reader returned. A channel to an adopting node replaces a closed one
	// (Reregister) under both mu and feedq.mu; read under either.
	local     *localchan.Server
	localDone chan struct{}
	localReg  bool   // WithLocalRegistration
	sockPath  string // WithLocalSocket
	// serving owns every channel's reader (serveLocal): Shutdown waits for them, also
	// for one a concurrent registration on a socket replaced.
	serving sync.WaitGroup
	// localFeeds: the workloads' feeds go on the local channel (WithLocalFeeds).
	localFeeds bool
	// feedq orders and keeps the feed messages; feedLoop (stopped by feedStop,
	// waited for by feeding) sends them.
	feedq    *feedQueue
	feedStop context.CancelFunc
	feeding  sync.WaitGroup
	hold     string // WithTestHold
	// held (testhold.HeartbeatLate only; nil otherwise) hands the heartbeat loop a
	// start whose heartbeat it is to take before the agent has the start.
	held chan *heldBeat

	// work owns the goroutines handling requests and replaying state: Shutdown stops
	// taking new ones and waits (bounded) for them.
	work     sync.WaitGroup
	workMu   sync.Mutex
	closing  bool
	inFlight chan struct{}
	renewing sync.WaitGroup // the renewal of the nexlet's own user (renewLoop)
	busy     *atomic.Int64  // requests taken on nc and not yet answered (serve)
	cd       protocol.NatsConnectionData
	reg      *protocol.RegisterAgentRequest // what serve describes the service with

	mu      sync.Mutex
	nc      *nats.Conn
	svc     *endpoints
	agentID string
	regType string
	// relay: the node passes on this nexlet's feeds (NexdFeedRelay), whose user may
	// not publish on $NEX.FEED itself.
	relay   bool
	stop    context.CancelFunc
	done    chan struct{}
	runCtx  context.Context // ends at Shutdown: the ended-workload reports' lifetime
	reports sync.WaitGroup  // ended-workload reports being retried
	unacked map[string]*endedReport
	// regs counts registrations with a node process (Reregister adds one): a refusal
	// of an ended report sent before the latest one does not count.
	regs int
	// replaying holds the node's stored workloads handed to the agent and not yet
	// through its StartWorkload: a list lists them as starting (handleQuery), a stop
	// waits for them (handleStop).
	replaying map[string]replayingWorkload
	// arriving holds the starts taken (read from the local channel, or handed to their
	// handler by NATS) whose handling is not through yet: waiting for a slot
	// (maxInFlight), or in the agent's start. A registration lists them as held, and a
	// replay of one waits for it (arrive).
	arriving map[string]*arrival
}

// arrival is a workload id whose start (n of them, a node's repeat counting apart) is
// taken and not through; done is closed once the last is.
type arrival struct {
	n    int
	done chan struct{}
}

// replayingWorkload is a stored workload whose replay is not through yet.
type replayingWorkload struct {
	req  protocol.StartWorkloadRequest
	done chan struct{} // closed once its replay's StartWorkload returned
}

// Option configures a Runner.
type Option func(*Runner)

// WithLogger sets the runner's logger.
func WithLogger(l *slog.Logger) Option { return func(r *Runner) { r.log = l } }

// WithHeartbeatInterval changes the heartbeat period (tests use short ones).
func WithHeartbeatInterval(d time.Duration) Option { return func(r *Runner) { r.hbEvery = d } }

// WithShutdownWait bounds how long Shutdown waits for requests in flight and the
// replay of existing workloads.
func WithShutdownWait(d time.Duration) Option { return func(r *Runner) { r.sdWait = d } }

// WithRegisterTimeout bounds the wait for the node's REGISTER reply.
func WithRegisterTimeout(d time.Duration) Option { return func(r *Runner) { r.regWait = d } }

// WithRegistrationKey signs the registration with kp: the per-start key a supervising
// node hands its local nexlets, or a remote nexlet's key listed in the node's
// remote_nexlets. A node refuses a supervised nexlet's registration without it.
func WithRegistrationKey(kp nkeys.KeyPair) Option { return func(r *Runner) { r.regKey = kp } }

// WithPatientStart makes Run wait, for as long as the runner lives, while no NATS
// server is reachable or nothing answers the registration: for a nexlet its node
// starts before the node can answer (nexd's native nexlet), whose lifetime the node
// decides. Without it Run fails at once when no server is reachable, and when no node
// answers within the register timeout.
func WithPatientStart() Option { return func(r *Runner) { r.patient = true } }

// WithRegistrationDial makes Run register on the connection d dialled ahead.
func WithRegistrationDial(d *Dial) Option { return func(r *Runner) { r.dial = d } }

// WithConnectSocket makes the connection with the credentials the registration
// returns on s, the socket to the first NATS server opened ahead (SocketAhead), when
// it fits. The caller closes s.
func WithConnectSocket(s *Socket) Option { return func(r *Runner) { r.sock = s } }

// Dial is a registration connection dialled in the background (DialAhead).
type Dial struct {
	done  chan struct{}
	nc    *nats.Conn
	err   error
	mu    sync.Mutex
	taken bool
}

// DialAhead connects with a nexlet's registration credentials in the background, as
// patiently as WithPatientStart, so that the connect overlaps with the nexlet building
// itself (its key, users, cgroups); name is the connection's name (Run's own is
// "nexlet-<registered name>-register"). Hand it to the runner with
// WithRegistrationDial, and Close it when the nexlet ends.
func DialAhead(ctx context.Context, creds protocol.NatsConnectionData, name string, log *slog.Logger) *Dial {
	d := &Dial{done: make(chan struct{})}
	go func() {
		defer close(d.done)
		d.nc, d.err = connectPatiently(ctx, creds, name, nil, true, log)
	}()
	return d
}

func (d *Dial) take() (*nats.Conn, error) {
	<-d.done
	d.mu.Lock()
	defer d.mu.Unlock()
	d.taken = true
	return d.nc, d.err
}

// Close waits for the dial and closes its connection unless Run took it.
func (d *Dial) Close() {
	<-d.done
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.taken && d.nc != nil {
		d.nc.Close()
	}
	d.taken = true
}

// RegistrationKeyFromEnv reads the per-start registration key a node hands a local
// nexlet (NEX_AGENT_REGISTRATION_SEED); nil without one (an older node).
func RegistrationKeyFromEnv(env func(string) string) (nkeys.KeyPair, error) {
	seed := env(protocol.EnvAgentRegistrationSeed)
	if seed == "" {
		return nil, nil
	}
	kp, err := nkeys.FromSeed([]byte(seed))
	if err != nil {
		return nil, fmt.Errorf("environment variable %s: %w", protocol.EnvAgentRegistrationSeed, err)
	}
	return kp, nil
}

// WithLocalChannel serves start requests on the channel from the node that spawned
// this nexlet (localchan), besides NATS, once registered. The runner owns s.
func WithLocalChannel(s *localchan.Server) Option { return func(r *Runner) { r.local = s } }

// WithLocalRegistration makes Run register on the local channel (WithLocalChannel)
// rather than across the NATS server, for a node that said it takes the registration
// there (localchan.ServesRegistration); over NATS if the channel fails.
func WithLocalRegistration() Option { return func(r *Runner) { r.localReg = true } }

// WithLocalSocket names the socket (localchan.EnvSocket) on which a nexd that adopts
// this nexlet takes its channel: told to register again (Reregister) with no channel
// open, the nexlet dials it and registers, gets its starts and sends its feeds there as
// on the pair it was spawned with; over NATS when it cannot (an older nexd).
func WithLocalSocket(path string) Option { return func(r *Runner) { r.sockPath = path } }

// WithTestHold names the windows (testhold.Env's list) an e2e fault test holds the
// runner in; empty (every production start), none.
func WithTestHold(list string) Option { return func(r *Runner) { r.hold = list } }

// NewRunner prepares a runner for agent a on node nodeID; ctx bounds its lifetime.
func NewRunner(ctx context.Context, nodeID string, a Agent, opts ...Option) (*Runner, error) {
	if nodeID == "" {
		return nil, errors.New("nexlet runner: node id is empty")
	}
	if a == nil {
		return nil, errors.New("nexlet runner: agent is nil")
	}
	r := &Runner{ctx: ctx, nodeID: nodeID, agent: a, hbEvery: DefaultHeartbeatInterval, regWait: DefaultRegisterTimeout,
		sdWait: DefaultShutdownWait, inFlight: make(chan struct{}, maxInFlight), feedq: newFeedQueue()}
	for _, o := range opts {
		o(r)
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.hbEvery <= 0 {
		r.hbEvery = DefaultHeartbeatInterval
	}
	if testhold.Holds(r.hold, testhold.HeartbeatLate) {
		r.held = make(chan *heldBeat)
	}
	return r, nil
}

// NodeID is the node the runner serves.
func (r *Runner) NodeID() string { return r.nodeID }

// AgentID is the id the runner registered under (empty before Run).
func (r *Runner) AgentID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.agentID
}

// NC is the nexlet's connection (with its real credentials) once Run has succeeded.
func (r *Runner) NC() *nats.Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nc
}

// Run registers with the node using the registration credentials, reconnects with the
// credentials the node returns, starts heartbeats, serves the agent endpoints and replays
// the node's existing state in the background. It returns once setup is done.
func (r *Runner) Run(agentID string, creds protocol.NatsConnectionData) error {
	if agentID == "" {
		return errors.New("nexlet runner: agent id is empty")
	}
	reg, err := r.agent.Register()
	if err != nil {
		return fmt.Errorf("nexlet register: %w", err)
	}
	var resp *protocol.RegisterAgentResponse
	var mark uint64 // the agent's stops when it registered (ReplayGuard)
	if r.local != nil && r.localDone == nil {
		if err := r.local.Announce(); err != nil {
			r.log.Warn("local channel to the node failed; start requests come over NATS", "err", err)
		}
		if r.localReg {
			var failed error
			wait := patientRetryMin
			for {
				resp, mark, failed, err = r.registerLocal(agentID, reg)
				if !r.againAfterRefusal(err, &wait) {
					break
				}
			}
			if err != nil {
				return err
			}
			if failed != nil {
				r.log.Warn("registering on the local channel failed; registering over NATS", "err", failed)
			}
		}
	}
	if resp == nil {
		var rnc *nats.Conn
		if r.dial != nil {
			rnc, err = r.dial.take()
		} else {
			rnc, err = connectPatiently(r.ctx, creds, "nexlet-"+reg.Name+"-register", nil, r.patient, r.log)
		}
		if err != nil {
			return fmt.Errorf("nexlet register: %w", err)
		}
		resp, mark, err = r.registerPatiently(rnc, agentID, reg)
		rnc.Close()
		if err != nil {
			return err
		}
	}

	live, err := newLiveCreds(resp.ConnectionData)
	if err != nil {
		return fmt.Errorf("nexlet register: %w", err)
	}
	nc, err := r.connectNode(resp.ConnectionData, "nexlet-"+reg.Name, live)
	if err != nil {
		return fmt.Errorf("nexlet connect with the node's credentials: %w", err)
	}
	// The replay set is taken before the endpoints serve and the first heartbeat (which
	// lets the node's lists ask this nexlet) goes out: a list then names every stored
	// workload, as starting until replayed. Before, taken after both: lists in between
	// came back whole with none of them (e2e TestListDuringReplayIsWhole, 0 of 100).
	replay := r.takeReplay(resp.ExistingState)
	busy := new(atomic.Int64)
	// Not flushed here: the first heartbeat's flush, below, writes the subscriptions
	// and the heartbeat behind them together (serveUnflushed).
	svc, err := r.serveUnflushed(nc, agentID, busy)
	if err != nil {
		r.dropReplay(replay)
		nc.Close()
		return err
	}
	hbCtx, stop := context.WithCancel(r.ctx)
	r.mu.Lock()
	r.nc, r.svc, r.agentID, r.regType, r.stop, r.done = nc, svc, agentID, reg.RegisterType, stop, make(chan struct{})
	r.runCtx, r.busy, r.cd, r.reg, r.relay = hbCtx, busy, resp.ConnectionData, reg, resp.NexdFeedRelay
	r.mu.Unlock()
	mode := feedNATS
	if r.local != nil && r.localDone == nil {
		if r.localFeeds {
			r.local.OnFeedAck = r.feedAck
			mode = feedLocal
		}
		r.localDone = make(chan struct{})
		local, done := r.local, r.localDone
		r.serving.Go(func() { r.serveLocal(local, done, agentID) })
	}
	if r.feedStop == nil {
		fctx, stopFeeds := context.WithCancel(context.Background())
		r.feedStop = stopFeeds
		r.feeding.Go(func() { r.feedLoop(fctx) })
	}
	r.setFeedMode(mode)
	r.firstHeartbeat()
	go r.heartbeatLoop(hbCtx)
	if live != nil {
		r.renewing.Go(func() { r.renewLoop(hbCtx, live) })
	}

	r.replay(resp.ExistingState, replay, mark)
	// A nexlet its node spawned (a local channel from it, or its socket to adopt it)
	// logs to that node's log, where the node logs the registration itself: at Info
	// each start showed "nexlet registered" twice.
	level := slog.LevelInfo
	if r.local != nil || r.sockPath != "" {
		level = slog.LevelDebug
	}
	r.log.Log(context.Background(), level, "nexlet registered", "node_id", r.nodeID, "agent_id", agentID, "name", reg.Name, "type", reg.RegisterType)
	return nil
}

// Bounds of the retries of a patient start (WithPatientStart): nexd starts its native
// nexlet while it connects to NATS itself and builds the node, so the first attempt
// may come a few milliseconds before the node serves.
const (
	patientRetryMin = 2 * time.Millisecond
	patientRetryMax = time.Second
)

// connectPatiently connects with creds (the registration's, or with live the ones
// the node returned); with a patient start it retries while no server is reachable:
// an outage nexd waits out too, or a nexd that re-executes (or restarts with
// live_restore) just after the registration and stops its embedded server until the
// new image runs it. Any other error (credentials refused) ends it.
func connectPatiently(ctx context.Context, creds protocol.NatsConnectionData, name string, live *liveCreds, patient bool, log *slog.Logger, extra ...nats.Option) (*nats.Conn, error) {
	wait := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		nc, err := connect(creds, name, live, extra...)
		if err == nil || !patient || !errors.Is(err, nats.ErrNoServers) {
			return nc, err
		}
		if attempt == 1 {
			log.Warn("no NATS server reachable yet; retrying", "connection", name, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (gave up: %w)", err, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(wait*2, patientRetryMax)
	}
}

// connectNode connects with the credentials the registration returned: on the socket
// opened ahead (WithConnectSocket) when it is to the server nats.go dials first and
// still fresh, else dialled now. A connect that took the socket and failed is made
// once more, dialled now: the server may have closed the socket meanwhile (its
// auth_timeout), which nats.go would report as the connect's error.
func (r *Runner) connectNode(cd protocol.NatsConnectionData, name string, live *liveCreds) (*nats.Conn, error) {
	if r.sock != nil {
		nc, err := connectPatiently(r.ctx, cd, name, live, r.patient, r.log,
			nats.SetCustomDialer(socketDialer{s: r.sock, timeout: connectTimeout}))
		if err == nil || !r.sock.Used() {
			return nc, err
		}
		r.log.Debug("connecting on the socket opened ahead failed; dialling anew", "err", err)
	}
	return connectPatiently(r.ctx, cd, name, live, r.patient, r.log)
}

// registerPatiently is register; with a patient start it is retried while nothing
// answers the registration subject (the node API does not serve yet).
func (r *Runner) registerPatiently(nc *nats.Conn, agentID string, reg *protocol.RegisterAgentRequest) (*protocol.RegisterAgentResponse, uint64, error) {
	wait := patientRetryMin
	for {
		resp, mark, err := r.register(nc, agentID, reg)
		if r.againAfterRefusal(err, &wait) {
			continue
		}
		if err == nil || !r.patient || !errors.Is(err, nats.ErrNoResponders) {
			return resp, mark, err
		}
		select {
		case <-r.ctx.Done():
			return nil, 0, fmt.Errorf("%w (gave up: %w)", err, r.ctx.Err())
		case <-time.After(wait):
		}
		wait = min(wait*2, patientRetryMax)
	}
}

// errStateUnreadable is a node's refusal of a registration while it cannot read its
// state store (protocol.ErrTextStateUnreadable).
var errStateUnreadable = errors.New(protocol.ErrTextStateUnreadable)

// againAfterRefusal says whether the runner registers again after err, the node's
// refusal while it cannot read its state store, having waited *wait (doubled, to
// patientRetryMax): registered with nothing replayed, the nexlet would have taken the
// workloads it holds records of for ones the node no longer has. Any runner does, a
// patient one or not: the node answered, and a nexlet that ended on the refusal would be
// restarted by its supervisor only up to its restart limit, during an outage of any
// length. False for any other outcome, and once the runner ends.
func (r *Runner) againAfterRefusal(err error, wait *time.Duration) bool {
	if !errors.Is(err, errStateUnreadable) {
		return false
	}
	level := slog.LevelDebug
	if *wait == patientRetryMin {
		level = slog.LevelWarn // once per outage
	}
	r.log.Log(context.Background(), level, "the node cannot read its state for this nexlet's registration yet; registering again", "err", err)
	select {
	case <-r.ctx.Done():
		return false
	case <-time.After(*wait):
	}
	*wait = min(*wait*2, patientRetryMax)
	return true
}

// serve adds the nexlet's endpoints on nc (its first connection, or the one of a
// renewed user) and makes sure the server has them. busy counts the requests taken on
// nc and not yet answered, so that nc is closed only after them.
func (r *Runner) serve(nc *nats.Conn, agentID string, busy *atomic.Int64) (*endpoints, error) {
	svc, err := r.serveUnflushed(nc, agentID, busy)
	if err != nil {
		return nil, err
	}
	// A renewed user's endpoints must be in before the old connection's stop.
	if err := nc.Flush(); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("nexlet endpoints: flush: %w", err)
	}
	return svc, nil
}

// serveUnflushed is serve without the wait for the server's PONG: the subscriptions
// are in nc's buffer or written. Run's first heartbeat goes out behind them on the same
// connection, which the server reads in order, so a node that has that heartbeat
// knows the server had the endpoints' subscriptions first (and asks the nexlet, bids
// for it, only then); one round trip fewer on the way to the node's READY.
func (r *Runner) serveUnflushed(nc *nats.Conn, agentID string, busy *atomic.Int64) (*endpoints, error) {
	eps := []struct {
		name, subject string
		h             micro.HandlerFunc
	}{
		{"StartWorkload", protocol.AgentPrefix(r.nodeID) + "." + agentID + ".STARTWORKLOAD.*", r.asyncStart(nc, busy)},
		// The shared subjects, where upstream's node asks. A nexd node that asked this
		// nexlet on its own subjects says so (HeaderAskedDirect): then the shared
		// request is not for it. Answers are named (HeaderAgentID), so a nexd node
		// drops one that comes here anyway instead of counting it for the nexlets it
		// asks here (upstream's SDK).
		{"StopWorkload", protocol.StopWorkloadSubject(r.nodeID, "*"), notAskedDirect(r.async(nc, busy, r.named(r.handleStop)))},
		{"GetWorkload", protocol.GetWorkloadSubject(r.nodeID, "*"), notAskedDirect(counted(busy, r.named(r.handleGet)))},
		{"QueryWorkloads", protocol.QueryWorkloadsSubject(r.nodeID), notAskedDirect(counted(busy, r.queryOn(nc)))},
		// The same, asked of this nexlet alone (AnswersDirect): a nexd node asks here;
		// upstream's asks on the shared subjects above.
		{"StopWorkloadDirect", protocol.StopWorkloadAgentSubject(r.nodeID, agentID, "*"), r.async(nc, busy, r.named(r.handleStop))},
		{"GetWorkloadDirect", protocol.GetWorkloadAgentSubject(r.nodeID, agentID, "*"), counted(busy, r.named(r.handleGet))},
		{"QueryWorkloadsDirect", protocol.QueryWorkloadsAgentSubject(r.nodeID, agentID), counted(busy, r.queryOn(nc))},
		{"PingAgent", protocol.PingAgentSubject(r.nodeID, agentID), counted(busy, r.handlePing)},
		{"PingAllAgents", protocol.PingAllAgentsSubject(r.nodeID), counted(busy, r.handlePing)},
		{"SetLameduck", protocol.SetLameduckAgentsSubject(r.nodeID), r.async(nc, busy, r.handleLameduck)},
	}
	svc := &endpoints{}
	for _, ep := range eps {
		h := ep.h
		sub, err := nc.QueueSubscribe(ep.subject, agentID, func(m *nats.Msg) {
			h(&detached{nc: nc, subject: m.Subject, reply: m.Reply, data: m.Data, hdr: micro.Headers(m.Header), at: time.Now()})
		})
		if err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("nexlet endpoint %s on %s: %w", ep.name, ep.subject, err)
		}
		svc.subs = append(svc.subs, sub)
	}
	return svc, nil
}

// endpoints are a nexlet's request handlers on one connection: queue subscriptions
// (the queue group is the agent id, as upstream's), answered as micro requests are,
// but no micro service: that subscribes to $SRV discovery as well, which no node asks
// and a nexlet's user may not read (it answered `nats micro` as the node's service).
type endpoints struct{ subs []*nats.Subscription }

// Stop drains the subscriptions: what they hold is still handled.
func (e *endpoints) Stop() error {
	var errs error
	for _, s := range e.subs {
		if err := s.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			errs = errors.Join(errs, fmt.Errorf("draining %s: %w", s.Subject, err))
		}
	}
	return errs
}

// notAskedDirect leaves a request on a shared subject unanswered when the node asked
// this nexlet on its own subjects (HeaderAskedDirect).
func notAskedDirect(h micro.HandlerFunc) micro.HandlerFunc {
	return func(req micro.Request) {
		if req.Headers().Get(protocol.HeaderAskedDirect) != "" {
			return
		}
		h(req)
	}
}

// named answers every reply of h with this nexlet's HeaderAgentID.
func (r *Runner) named(h micro.HandlerFunc) micro.HandlerFunc {
	return func(req micro.Request) { h(namedRequest{Request: req, id: r.AgentID()}) }
}

// namedRequest adds HeaderAgentID to each of its replies.
type namedRequest struct {
	micro.Request
	id string
}

func (n namedRequest) self(opts []micro.RespondOpt) []micro.RespondOpt {
	return append(slices.Clip(opts), micro.WithHeaders(micro.Headers{protocol.HeaderAgentID: []string{n.id}}))
}

func (n namedRequest) Respond(b []byte, opts ...micro.RespondOpt) error {
	return n.Request.Respond(b, n.self(opts)...)
}

func (n namedRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	return n.Request.RespondJSON(v, n.self(opts)...)
}

func (n namedRequest) Error(code, desc string, data []byte, opts ...micro.RespondOpt) error {
	return n.Request.Error(code, desc, data, n.self(opts)...)
}

// counted runs a quick handler, counted in busy while it answers.
func counted(busy *atomic.Int64, h micro.HandlerFunc) micro.HandlerFunc {
	return func(req micro.Request) {
		busy.Add(1)
		defer busy.Add(-1)
		h(req)
	}
}

// register sends the registration on nc (the registration user's connection, or the
// nexlet's own when it registers again) and returns the node's accepting reply and the
// agent's stop mark taken with it (registration).
func (r *Runner) register(nc *nats.Conn, agentID string, reg *protocol.RegisterAgentRequest) (*protocol.RegisterAgentResponse, uint64, error) {
	req, mark, err := r.registration(agentID, reg)
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithTimeout(r.ctx, r.regWait)
	msg, err := nc.RequestMsgWithContext(ctx, req)
	cancel()
	if err != nil {
		return nil, 0, fmt.Errorf("nexlet register on %s: %w", req.Subject, err)
	}
	resp, err := registered(req.Subject, msg)
	return resp, mark, err
}

// registerLocal sends the registration on the local channel and returns the node's
// accepting reply, or err when the node refused it (or the runner ended), or failed
// when the channel did not carry it: then it goes over NATS. A patient start waits
// for as long as the runner lives (the node answers once it serves), else for the
// register timeout.
func (r *Runner) registerLocal(agentID string, reg *protocol.RegisterAgentRequest) (resp *protocol.RegisterAgentResponse, mark uint64, failed, err error) {
	req, mark, err := r.registration(agentID, reg)
	if err != nil {
		return nil, 0, nil, err
	}
	ctx, cancel := r.ctx, context.CancelFunc(func() {})
	if !r.patient {
		ctx, cancel = context.WithTimeout(r.ctx, r.regWait)
	}
	msg, cerr := r.local.Call(ctx, req.Subject, req.Header, req.Data)
	cancel()
	if cerr != nil {
		if r.ctx.Err() != nil {
			return nil, 0, nil, fmt.Errorf("nexlet register on the local channel: %w", r.ctx.Err())
		}
		return nil, 0, cerr, nil
	}
	resp, err = registered(req.Subject+" (local channel)", msg)
	return resp, mark, nil, err
}

// registration is the registration message, signed with the start's key if any, and
// a ReplayGuard's stop mark taken with its Stopped list (0 for another agent).
func (r *Runner) registration(agentID string, reg *protocol.RegisterAgentRequest) (*nats.Msg, uint64, error) {
	// The runner reports ended workloads as acknowledged requests (EmitEvent), so the
	// node may ignore the forgeable WORKLOADSTOPPED events for this nexlet.
	reg.ReportsEnded = true
	// It serves the node's fan-outs on its own agent id's subjects too (serve), where a
	// nexd node asks it, so a rogue nexlet cannot answer for it.
	reg.AnswersDirect = true
	// It publishes feeds through the node when told (feedSubject); a signed
	// registration without this is taken for an older nexlet's.
	reg.FeedRelay = true
	if h, ok := r.agent.(WorkloadHolder); ok {
		// The starts taken and not through are held too: each is the agent's once its
		// start is through, so taken before the agent's list, every start that arrived
		// is in one of them. Before, a start waiting for a slot was in neither: the node
		// took it for one that never reached the nexlet and replayed it, and the start
		// ran the job a second time once it had its slot (e2e
		// TestReplayOfQueuedStartRunsOnce).
		arriving := r.arrivingIDs()
		ids := h.HeldWorkloads()
		for _, id := range arriving {
			if !slices.Contains(ids, id) {
				ids = append(ids, id)
			}
		}
		if len(arriving) > 0 {
			slices.Sort(ids)
		}
		if ids == nil {
			ids = []string{} // holds nothing: every stored job ran before
		}
		reg.Workloads = &ids
		if m, ok := r.agent.(MemoryKeeper); ok {
			// Named after the list is taken: a memory dropped in between (a shutdown's
			// stops) is no longer named, so no list it made whole is vouched for.
			reg.Memory = m.StartsMemory()
		}
	}
	var mark uint64
	if g, ok := r.agent.(ReplayGuard); ok {
		reg.Stopped, mark = g.StopsMark()
	} else if s, ok := r.agent.(StopRememberer); ok {
		reg.Stopped = s.RecentlyStopped()
	}
	_, reg.StopAck = r.agent.(StopRecorder)
	body, err := protocol.Marshal(reg)
	if err != nil {
		return nil, 0, fmt.Errorf("nexlet register: encode request: %w", err)
	}
	subj := protocol.RegisterSubject(r.nodeID, agentID)
	req := nats.NewMsg(subj)
	req.Data = body
	if r.regKey != nil {
		if err := signRegistration(req, r.regKey); err != nil {
			return nil, 0, fmt.Errorf("nexlet register: %w", err)
		}
	}
	return req, mark, nil
}

// registered reads the node's reply to a registration sent on subj.
func registered(subj string, msg *nats.Msg) (*protocol.RegisterAgentResponse, error) {
	if code := msg.Header.Get(protocol.HeaderErrorCode); code != "" {
		if code == "503" && msg.Header.Get(protocol.HeaderError) == protocol.ErrTextStateUnreadable {
			return nil, fmt.Errorf("nexlet register on %s refused: %w: %s", subj, errStateUnreadable, bytes.TrimSpace(msg.Data))
		}
		return nil, fmt.Errorf("nexlet register on %s refused: %s %s: %s", subj, code, msg.Header.Get(protocol.HeaderError), bytes.TrimSpace(msg.Data))
	}
	var resp protocol.RegisterAgentResponse
	if err := protocol.Decode(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("nexlet register on %s: %w", subj, err)
	}
	if !resp.Success {
		return nil, fmt.Errorf("nexlet register on %s refused: %s", subj, resp.Message)
	}
	return &resp, nil
}

// takeReplay records the node's stored workloads as replaying (listed as starting,
// their stops held) until replay's StartWorkload of each returns, and returns them.
func (r *Runner) takeReplay(state map[string]protocol.AgentStartWorkloadRequest) map[string]replayingWorkload {
	if len(state) == 0 {
		return nil
	}
	r.holdReplay(testhold.ReplayLate, "the replay set is taken late", testhold.ReplayLateBy)
	r.log.Info("replaying existing workloads", "count", len(state))
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.replaying == nil {
		r.replaying = map[string]replayingWorkload{}
	}
	mine := make(map[string]replayingWorkload, len(state))
	for id, req := range state {
		rw := replayingWorkload{req: req.Request, done: make(chan struct{})}
		r.replaying[id], mine[id] = rw, rw
	}
	return mine
}

// holdReplay is the replay's test holds (point: testhold.ReplayLate or ReplayHeld; a
// no-op unless the hold list names it): with a release directory in the list, it waits
// for the test's release (at most testhold.ReplayHeldMax), else delay. Each step is
// logged for the test, which lists while the nexlet is held there.
func (r *Runner) holdReplay(point, what string, delay time.Duration) {
	if !testhold.Holds(r.hold, point) {
		return
	}
	if !testhold.ReleaseNamed(r.hold) {
		r.log.Warn("test hold: "+what, "hold", point, "delay", delay)
		time.Sleep(delay)
		return
	}
	r.log.Warn("test hold: "+what+" until released", "hold", point)
	released := testhold.Released(r.ctx, r.hold, point, testhold.ReplayHeldMax)
	r.log.Warn("test hold: the replay goes on", "hold", point, "released", released)
}

// dropReplay lets go of a replay set taken for a start that failed before its replay.
func (r *Runner) dropReplay(mine map[string]replayingWorkload) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, rw := range mine {
		if r.replaying[id].done == rw.done {
			delete(r.replaying, id)
		}
		close(rw.done)
	}
}

// replay hands the node's stored workloads (taken by takeReplay as mine) to the agent
// in the background (existing: it adopts what still runs; a ReplayGuard with mark, its
// stops when it made the registration they answer), then tells a ReplayAware agent
// which ones they were.
func (r *Runner) replay(state map[string]protocol.AgentStartWorkloadRequest, mine map[string]replayingWorkload, mark uint64) {
	guard, _ := r.agent.(ReplayGuard)
	started := r.goFn(func() {
		if len(state) > 0 {
			r.holdReplay(testhold.ReplayHeld, "the replay is held", 0)
		}
		// A few at a time: recovery of many workloads should not be serial, nor
		// start them all at once.
		ids := make([]string, 0, len(state))
		sem := make(chan struct{}, replayParallelism)
		var wg sync.WaitGroup
		for id, req := range state {
			ids = append(ids, id)
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				if !r.afterArrival(id) {
					r.finishReplay(id, mine)
					return
				}
				var err error
				if guard != nil {
					_, err = guard.StartReplayed(id, &req, mark)
				} else {
					_, err = r.agent.StartWorkload(id, &req, true)
				}
				r.finishReplay(id, mine)
				if err != nil {
					r.log.Error("replay of workload failed", "workload_id", id, "err", err)
				}
			}()
		}
		wg.Wait()
		if ra, ok := r.agent.(ReplayAware); ok {
			ra.ReplayDone(ids)
		}
	})
	if !started {
		r.dropReplay(mine) // shutting down: a stop waiting for one goes ahead
	}
}

// finishReplay ends the replay of id (taken by takeReplay as mine[id]).
func (r *Runner) finishReplay(id string, mine map[string]replayingWorkload) {
	r.mu.Lock()
	if r.replaying[id].done == mine[id].done { // not a later replay's
		delete(r.replaying, id)
	}
	r.mu.Unlock()
	close(mine[id].done)
}

// arrive counts a start of id as taken, until the returned leave (called once).
func (r *Runner) arrive(id string) (leave func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.arriving == nil {
		r.arriving = map[string]*arrival{}
	}
	a := r.arriving[id]
	if a == nil {
		a = &arrival{done: make(chan struct{})}
		r.arriving[id] = a
	}
	a.n++
	return func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if a.n--; a.n == 0 {
			delete(r.arriving, id)
			close(a.done)
		}
	}
}

// arrivingIDs are the ids of the starts taken and not through.
func (r *Runner) arrivingIDs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Collect(maps.Keys(r.arriving))
}

// afterArrival waits, for a replay of id, until the starts of id taken before it are
// through, and says whether to go on (false: the runner shuts down). Such a start
// reached this nexlet before the registration the replay answers (which listed it as
// held) and waits for a slot or is in its checks; the agent sees it first, and the
// replay of a workload it holds starts nothing: one run. Before, the replay started
// the job, and the start, once through its wait, ran it again.
func (r *Runner) afterArrival(id string) bool {
	r.mu.Lock()
	a, ctx := r.arriving[id], r.runCtx
	r.mu.Unlock()
	if a == nil {
		return true
	}
	if ctx == nil {
		ctx = r.ctx
	}
	r.log.Info("replay of a workload whose start is still in flight here waits for that start", "workload_id", id)
	select {
	case <-a.done:
		return true
	case <-ctx.Done():
		return false
	}
}

// Bounds of the retries of Reregister.
const (
	reregisterRetryMin = 250 * time.Millisecond
	reregisterRetryMax = 5 * time.Second
)

// Reregister registers the running nexlet again, on its own connection and signed with
// the key of its start: a new node process (nexd restarted or re-executed) adopted it
// and knows nothing of it yet. It retries until the node accepts or the runner shuts
// down, then replays the node's stored workloads (what still runs is kept as it is) and
// sends again every workload-ended report the node never acknowledged. The credentials
// in the reply are not used: the nexlet keeps its connection.
func (r *Runner) Reregister() error {
	r.mu.Lock()
	nc, agentID, ctx := r.nc, r.agentID, r.runCtx
	r.mu.Unlock()
	if nc == nil || ctx == nil {
		return errors.New("nexlet register again: not running")
	}
	if done, err := r.reregisterOnSocket(ctx, agentID); done || err != nil {
		return err
	}
	wait := reregisterRetryMin
	for attempt := 1; ; attempt++ {
		reg, err := r.agent.Register()
		if err != nil {
			return fmt.Errorf("nexlet register again: %w", err)
		}
		resp, mark, err := r.register(r.NC(), agentID, reg) // the current one: a renewal replaces it
		if err == nil {
			r.registeredAgain(agentID, resp, mark, feedNATS, attempt, "nats")
			return nil
		}
		r.log.Debug("registering again failed; retrying", "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("nexlet register again: %w", err)
		case <-time.After(wait):
		}
		wait = min(wait*2, reregisterRetryMax)
	}
}

// registeredAgain takes a new node process's acceptance of the registration sent
// again: the feeds kept while no node took them go now (in mode, on the channel or over
// NATS), in order, before any new one; the node's stored workloads are replayed and the
// unacknowledged ended reports sent again.
func (r *Runner) registeredAgain(agentID string, resp *protocol.RegisterAgentResponse, mark uint64, mode feedMode, attempt int, via string) {
	r.mu.Lock()
	r.regs++
	r.relay = resp.NexdFeedRelay
	r.mu.Unlock()
	r.setFeedMode(mode)
	r.log.Info("nexlet registered again with a new node process", "node_id", r.nodeID, "agent_id", agentID,
		"attempts", attempt, "replayed", len(resp.ExistingState), "via", via)
	replay := r.takeReplay(resp.ExistingState) // before the heartbeat, as in Run
	r.firstHeartbeat()
	r.replay(resp.ExistingState, replay, mark)
	r.resendEnded()
}

// Bounds of the registration on an adopting node's socket (reregisterOnSocket): the
// wait for the closed channel's reader to see the close (a node that re-executed or
// exited closed its end just before it, or its successor, told this nexlet to register
// again), and for the node's answer; the node replaces an adopted nexlet that did not
// register within 15 s.
const (
	channelGoneWait    = 2 * time.Second
	socketRegisterWait = 5 * time.Second
)

// reregisterOnSocket registers again on the adopting node's socket (WithLocalSocket),
// which then carries this nexlet's starts and feeds as the pair did. done false: it
// did not (no socket named or reachable, a channel still open, the socket failing, a
// refusal there), and the registration goes over NATS; err: the runner ended. A
// refusal while the node cannot read its state is no such refusal: the node would
// refuse it over NATS alike, and it is asked again on the socket until served.
func (r *Runner) reregisterOnSocket(ctx context.Context, agentID string) (done bool, err error) {
	if r.sockPath == "" {
		return false, nil
	}
	r.mu.Lock()
	old, oldDone := r.local, r.localDone
	r.mu.Unlock()
	if oldDone != nil {
		select {
		case <-oldDone:
		case <-time.After(channelGoneWait):
			// The node at its other end did not go away: nothing adopted this nexlet.
			r.log.Warn("told to register again while the local channel to the node is open; registering over NATS")
			return false, nil
		}
	}
	sctx, cancel := context.WithTimeout(ctx, socketRegisterWait)
	defer cancel()
	f, node, err := localchan.Dial(sctx, r.sockPath)
	if err != nil {
		r.log.Info("no socket of the adopting node; registering again over NATS (feeds go over NATS)", "err", err)
		return false, nil
	}
	nodeID, err := procid.Of(node.PID)
	if err != nil {
		f.Close()
		r.log.Info("the adopting node's process cannot be read; registering again over NATS", "pid", node.PID, "err", err)
		return false, nil
	}
	s, err := localchan.NewServer(f)
	if err != nil {
		r.log.Info("the adopting node's socket failed; registering again over NATS", "err", err)
		return false, nil
	}
	if old != nil {
		s.OnLogLevel = old.OnLogLevel
	}
	fail := func(what string, err error) (bool, error) {
		_ = s.Close()
		if ctx.Err() != nil {
			return true, fmt.Errorf("nexlet register again: %w", ctx.Err())
		}
		r.log.Warn(what+"; registering again over NATS", "err", err)
		return false, nil
	}
	if err := s.Announce(); err != nil {
		return fail("announcing on the adopting node's socket failed", err)
	}
	var resp *protocol.RegisterAgentResponse
	var mark uint64
	wait, attempts := patientRetryMin, 0
	for {
		attempts++
		reg, err := r.agent.Register()
		if err != nil {
			_ = s.Close()
			return true, fmt.Errorf("nexlet register again: %w", err)
		}
		var req *nats.Msg
		req, mark, err = r.registration(agentID, reg)
		if err != nil {
			_ = s.Close()
			return true, err
		}
		cctx, ccancel := context.WithTimeout(ctx, socketRegisterWait)
		msg, err := s.Call(cctx, req.Subject, req.Header, req.Data)
		ccancel()
		if err != nil {
			return fail("registering on the adopting node's socket failed", err)
		}
		if resp, err = registered(req.Subject+" (node socket)", msg); err == nil {
			break
		}
		// Refused while the node cannot read its state: asked again on the socket,
		// as Run does on its channel. Before, the nexlet went over NATS, which the node
		// refuses alike, and took its starts and feeds there for the rest of its run
		// (TestAdoptedNexletRegistersAgainOnSocketAfterRefusal).
		if !r.againAfterRefusal(err, &wait) {
			return fail("the adopting node refused the registration on its socket", err)
		}
	}
	mode := feedNATS
	if r.localFeeds {
		s.OnFeedAck = r.feedAck
		mode = feedLocal
	}
	done2 := make(chan struct{})
	q := r.feedq
	q.mu.Lock()
	r.mu.Lock()
	if r.stop == nil { // Shutdown began: it closes the channel it read
		r.mu.Unlock()
		q.mu.Unlock()
		_ = s.Close()
		return true, errors.New("nexlet register again: shutting down")
	}
	prev := r.local // old, whose node closed it; or a concurrent call's
	r.local, r.localDone = s, done2
	q.node = nodeID
	r.mu.Unlock()
	q.mu.Unlock()
	r.serving.Go(func() { r.serveLocal(s, done2, agentID) })
	if prev != nil {
		_ = prev.Close()
	}
	r.registeredAgain(agentID, resp, mark, mode, attempts, "socket")
	return true, nil
}

// signRegistration adds the key, the time and the signature over subject, time and
// body: the node takes each signed message once, and only while it is fresh.
func signRegistration(m *nats.Msg, kp nkeys.KeyPair) error {
	pub, err := kp.PublicKey()
	if err != nil {
		return fmt.Errorf("registration key: %w", err)
	}
	at := strconv.FormatInt(time.Now().UnixNano(), 10)
	sig, err := kp.Sign(protocol.RegistrationPayload(m.Subject, at, m.Data))
	if err != nil {
		return fmt.Errorf("sign registration: %w", err)
	}
	m.Header.Set(protocol.HeaderRegistrationKey, pub)
	m.Header.Set(protocol.HeaderRegistrationTime, at)
	m.Header.Set(protocol.HeaderRegistrationSig, base64.StdEncoding.EncodeToString(sig))
	return nil
}

// replayParallelism bounds how many replayed workloads start at once.
const replayParallelism = 8

// goFn runs f in a goroutine Shutdown waits for; false once Shutdown has begun.
func (r *Runner) goFn(f func()) bool {
	r.workMu.Lock()
	defer r.workMu.Unlock()
	if r.closing {
		return false
	}
	r.work.Go(f)
	return true
}

// Shutdown stops the endpoints and heartbeats, waits (at most the shutdown wait) for
// requests in flight and the replay, then drains the connection so their replies
// still go out.
func (r *Runner) Shutdown() error {
	r.mu.Lock()
	stop, done := r.stop, r.done
	r.stop = nil
	r.mu.Unlock()
	if stop == nil {
		return nil
	}
	stop()
	<-done
	// The workloads' last lines (a stop forwards what their pipes hold) go out
	// before the channel stops being read: the node's acknowledgements come on it.
	r.drainFeeds(feedDrainWait)
	r.feedStop()
	r.feeding.Wait()
	r.mu.Lock()
	local, localDone := r.local, r.localDone // no channel replaces it now: stop is nil
	r.mu.Unlock()
	if localDone != nil {
		_ = local.StopServing()
		<-localDone
	}
	r.serving.Wait() // a replaced channel's reader, closed with it
	r.reports.Wait()
	r.renewing.Wait()
	// A renewal may have moved the nexlet to a new connection meanwhile.
	r.mu.Lock()
	svc, nc := r.svc, r.nc
	r.svc = nil
	r.mu.Unlock()
	var errs error
	if err := svc.Stop(); err != nil {
		errs = errors.Join(errs, fmt.Errorf("stop endpoints: %w", err))
	}
	r.workMu.Lock()
	r.closing = true
	r.workMu.Unlock()
	finished := make(chan struct{})
	go func() { r.work.Wait(); close(finished) }() // ends with the last request
	t := time.NewTimer(r.sdWait)
	select {
	case <-finished:
	case <-t.C:
		errs = errors.Join(errs, fmt.Errorf("requests or replay still running after %s", r.sdWait))
	}
	t.Stop()
	if err := nc.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		errs = errors.Join(errs, fmt.Errorf("drain connection: %w", err))
	}
	if local != nil {
		_ = local.Close() // after the requests' replies
	}
	return errs
}

func (r *Runner) heartbeatLoop(ctx context.Context) {
	defer close(r.done)
	t := time.NewTicker(r.hbEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.heartbeat()
		case h := <-r.held: // nil but under testhold.HeartbeatLate
			r.heldHeartbeat(ctx, h)
			t.Reset(r.hbEvery) // the next a whole interval after the held one
		}
	}
}

func (r *Runner) heartbeat() {
	if testhold.Holds(r.hold, testhold.HeartbeatNever) {
		return
	}
	if hb, b := r.takeHeartbeat(); hb != nil {
		r.publishHeartbeat(b)
	}
}

// firstHeartbeat sends the heartbeat of a registration, which tells the node that
// the nexlet serves (its health is unknown, and it gets no bid, until then; nexd's READY
// waits for it), and writes it out at once: FlushTimeout writes the connection's buffer
// in place before it waits for the server's PONG. Left to nats.go's flusher goroutine,
// it sat in the buffer behind the nexlet's start-up work: the node had it 21-111 ms
// after the registration's reply in 4 of 5 starts at load 12, 3-5 ms flushed here. In
// Run the same write carries the endpoints' subscriptions ahead of it (serveUnflushed).
func (r *Runner) firstHeartbeat() {
	r.heartbeat()
	if err := r.NC().FlushTimeout(firstBeatFlush); err != nil {
		r.log.Debug("nexlet heartbeat: flush", "err", err) // written or buffered; the loop goes on
	}
}

// firstBeatFlush bounds the wait for the server's PONG after the first heartbeat.
const firstBeatFlush = time.Second

// takeHeartbeat asks the agent for its heartbeat and encodes it (nil: logged).
func (r *Runner) takeHeartbeat() (*protocol.AgentHeartbeat, []byte) {
	hb, err := r.agent.Heartbeat()
	if err != nil {
		r.log.Warn("nexlet heartbeat", "err", err)
		return nil, nil
	}
	b, err := protocol.Marshal(hb)
	if err != nil {
		r.log.Warn("nexlet heartbeat: encode", "err", err)
		return nil, nil
	}
	return hb, b
}

func (r *Runner) publishHeartbeat(b []byte) {
	nc, id := r.NC(), r.AgentID()
	if err := nc.Publish(protocol.AgentHeartbeatSubject(r.nodeID, id), b); err != nil {
		r.log.Warn("nexlet heartbeat: publish", "err", err)
	}
}

// heldBeat is a start's heartbeat under testhold.HeartbeatLate: the heartbeat loop
// closes taken once it took it; the start sends answered when its answer leaves.
type heldBeat struct {
	taken    chan struct{}
	answered chan time.Time // buffered: the start does not wait for the loop
}

// holdHeartbeat, under testhold.HeartbeatLate (nil otherwise), has the heartbeat loop
// take a heartbeat before the agent has the start, and returns once it did.
func (r *Runner) holdHeartbeat() *heldBeat {
	if r.held == nil {
		return nil
	}
	r.mu.Lock()
	ctx := r.runCtx // the heartbeat loop's
	r.mu.Unlock()
	if ctx == nil {
		ctx = r.ctx
	}
	h := &heldBeat{taken: make(chan struct{}), answered: make(chan time.Time, 1)}
	select {
	case r.held <- h:
	case <-ctx.Done():
		return nil
	}
	select {
	case <-h.taken:
	case <-ctx.Done():
	}
	return h
}

// answer tells the heartbeat loop when the start's answer left (nil h: no hold).
func (h *heldBeat) answer(at time.Time) {
	if h != nil {
		h.answered <- at
	}
}

// heldHeartbeat is testhold.HeartbeatLate's heartbeat: taken before the start's agent
// has it, published once the start is answered and the test released it (at most
// testhold.HeartbeatHeldMax after the answer), flushed, each step logged for the test.
// answered (the answer's time) is no later than the node kept the start: the test
// tells from it and the node's time of the heartbeat how long after the keep the node
// had it.
func (r *Runner) heldHeartbeat(ctx context.Context, h *heldBeat) {
	hb, b := r.takeHeartbeat()
	close(h.taken)
	if hb == nil {
		return
	}
	r.log.Warn("test hold: heartbeat taken before a start, held", "hold", testhold.HeartbeatLate,
		"workload_count", hb.Summary.WorkloadCount)
	var at time.Time
	select {
	case <-ctx.Done():
		return
	case at = <-h.answered:
	}
	released := testhold.Released(ctx, r.hold, testhold.HeartbeatLate, testhold.HeartbeatHeldMax)
	r.publishHeartbeat(b)
	err := r.NC().FlushTimeout(5 * time.Second)
	r.log.Warn("test hold: held heartbeat published", "hold", testhold.HeartbeatLate,
		"workload_count", hb.Summary.WorkloadCount, "answered", at.UTC().Format(time.RFC3339Nano), "released", released, "err", err)
}

// Logger returns a writer that publishes each write as one message on the workload's
// log feed (stream "stdout" or "stderr"; "metrics" goes to the metrics feed), with
// upstream's headers.
func (r *Runner) Logger(workloadID, namespace, stream string) io.Writer {
	subject := protocol.LogSubject(namespace, workloadID, stream)
	if stream == "metrics" {
		subject = protocol.MetricsSubject(namespace, workloadID)
	}
	return &feedWriter{r: r, subject: subject, ns: namespace}
}

type feedWriter struct {
	r       *Runner
	subject string
	ns      string
}

func (w *feedWriter) Write(p []byte) (int, error) {
	if w.r.NC() == nil {
		return 0, errors.New("nexlet log feed: runner is not connected")
	}
	m := nats.NewMsg(w.subject)
	m.Header.Set(FeedHeader(protocol.HeaderNamespace), w.ns)
	m.Header.Set(FeedHeader(protocol.HeaderGroup), "")
	m.Data = append([]byte(nil), p...)
	if err := w.r.feedOut(m); err != nil {
		return 0, err
	}
	return len(p), nil
}

// FeedHeader is the header key the SDK sends for one of upstream's log feed headers.
// nats.go (since v1.4x) refuses '/' in header keys, so upstream's "synadia.com/namespace"
// cannot be published as is; it goes out as "synadia.com-namespace".
func FeedHeader(upstreamKey string) string { return strings.ReplaceAll(upstreamKey, "/", "-") }

// EmitEvent publishes v as JSON on $NEX.FEED.<from>.events.<typ>.
func (r *Runner) EmitEvent(from, typ string, v any) error {
	nc := r.NC()
	if nc == nil {
		return errors.New("nexlet event: runner is not connected")
	}
	b, err := protocol.Marshal(v)
	if err != nil {
		return fmt.Errorf("nexlet event %s: encode: %w", typ, err)
	}
	if typ == protocol.EventWorkloadStopped {
		var ev protocol.WorkloadStoppedEvent
		if json.Unmarshal(b, &ev) == nil && ev.ID != "" {
			r.reportEnded(ev.ID, b)
		}
	}
	return r.feedOut(&nats.Msg{Subject: protocol.EventSubject(from, typ), Data: b})
}

// feedSubject is where a feed message on subject goes: the node's relay under this
// nexlet's agent id when the node relays its feeds, else subject itself (a node that
// does not relay: upstream's, or nexd's for a nexlet that does not sign).
func (r *Runner) feedSubject(subject string) string {
	r.mu.Lock()
	relay, id := r.relay, r.agentID
	r.mu.Unlock()
	if relay {
		return protocol.FeedRelaySubject(r.nodeID, id, subject)
	}
	return subject
}

// feedDrainWait bounds Shutdown's wait for the queued feed messages.
const feedDrainWait = 2 * time.Second

// Bounds of the retries of an ended-workload report.
const (
	endedRetryMin = 250 * time.Millisecond
	endedRetryMax = 5 * time.Second
	endedWait     = 5 * time.Second // one request
)

// reportEnded tells the node, as a request on the nexlet's own WORKLOADENDED subject,
// that a workload ended, and retries until the node acknowledges (or the runner shuts
// down): unlike the event, the report is neither forgeable nor lost.
func (r *Runner) reportEnded(workloadID string, body []byte) {
	r.mu.Lock()
	nc, agentID, ctx := r.nc, r.agentID, r.runCtx
	if nc == nil || ctx == nil {
		r.mu.Unlock()
		return
	}
	if r.unacked == nil {
		r.unacked = map[string]*endedReport{}
	}
	rep := r.unacked[workloadID]
	if rep == nil {
		rep = &endedReport{}
		r.unacked[workloadID] = rep
	}
	rep.body = body
	if rep.sending {
		r.mu.Unlock()
		return // the retrying goroutine sends the newest body
	}
	if r.stop == nil {
		// Shut down, or shutting down: its reports.Wait may have returned. The report
		// stays unacknowledged, as one the node refused.
		r.mu.Unlock()
		return
	}
	rep.sending = true
	// Under r.mu with the check above: Shutdown clears r.stop under it before waiting.
	r.reports.Add(1)
	r.mu.Unlock()
	subj := protocol.WorkloadEndedSubject(r.nodeID, agentID, workloadID)
	go func() {
		defer r.reports.Done()
		acked, parked := false, false
		defer func() {
			r.mu.Lock()
			if !parked {
				rep.sending = false
			}
			if acked && r.unacked[workloadID] == rep {
				delete(r.unacked, workloadID)
			}
			r.mu.Unlock()
		}()
		wait, noResponders := endedRetryMin, 0
		for attempt := 1; ; attempt++ {
			r.mu.Lock()
			body, regs := rep.body, r.regs
			r.mu.Unlock()
			rctx, cancel := context.WithTimeout(ctx, endedWait)
			msg, err := r.NC().RequestWithContext(rctx, subj, body) // the current one: a renewal replaces it
			cancel()
			if err == nil {
				if code := msg.Header.Get(protocol.HeaderErrorCode); code != "" {
					r.mu.Lock()
					again := r.regs != regs
					if !again {
						// Freed in the same critical section as the check, so that a
						// Reregister after it starts a new sender instead of leaving
						// the resend to this one.
						rep.sending, parked = false, true
					}
					r.mu.Unlock()
					if again {
						// Refused by a node process that did not know this nexlet yet,
						// and it registered again meanwhile (its resend found this
						// goroutine busy): send it once more, now.
						continue
					}
					// The node answered: retrying cannot change its mind. A new node
					// process that does not know this nexlet yet refuses too: the
					// report stays for Reregister to send again.
					r.log.Warn("node refused the workload-ended report", "workload_id", workloadID,
						"code", code, "err", msg.Header.Get(protocol.HeaderError))
					return
				}
				acked = true
				var ack protocol.WorkloadEndedAck
				if ec, ok := r.agent.(EndConfirmer); ok && protocol.Decode(msg.Data, &ack) == nil &&
					(ack.Removed || ack.StateRemoval == protocol.StateRemovalPending) {
					ec.EndConfirmed(workloadID)
				}
				return
			}
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, nats.ErrNoResponders) {
				// An upstream node serves no such subject; a nexd node that is away
				// gets the report again when this nexlet registers again
				// (Reregister).
				if noResponders++; noResponders >= 5 {
					return
				}
			}
			r.log.Debug("workload-ended report not acknowledged; retrying", "workload_id", workloadID, "attempt", attempt, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = min(wait*2, endedRetryMax)
		}
	}()
}

// endedReport is a workload-ended report the node has not acknowledged yet.
type endedReport struct {
	body    []byte
	sending bool // a goroutine is retrying it
}

// resendEnded sends every unacknowledged workload-ended report again (after
// registering with a new node process, which never saw them).
func (r *Runner) resendEnded() {
	r.mu.Lock()
	pending := make(map[string][]byte, len(r.unacked))
	for id, rep := range r.unacked {
		pending[id] = rep.body
	}
	r.mu.Unlock()
	for id, body := range pending {
		r.reportEnded(id, body)
	}
	if len(pending) > 0 {
		r.log.Info("sent unacknowledged workload-ended reports again", "count", len(pending))
	}
}

// async runs slow handlers (start, stop, lameduck) off the subscription's goroutine so
// that one workload's stop grace does not delay every other request. micro's own
// request may not be answered after its handler returned (it keeps statistics in it),
// so the goroutine answers through a detached copy on the same connection.
// The goroutines belong to the runner (Shutdown waits for them), and at most
// maxInFlight run at once.
func (r *Runner) async(nc *nats.Conn, busy *atomic.Int64, h micro.HandlerFunc) micro.HandlerFunc {
	return r.asyncFrom(nc, busy, h, false)
}

// asyncStart is async for starts: each start's id counts as arriving (arrive) from the
// moment NATS hands it over, before it waits for a slot, until it is through.
func (r *Runner) asyncStart(nc *nats.Conn, busy *atomic.Int64) micro.HandlerFunc {
	return r.asyncFrom(nc, busy, r.handleStart, true)
}

func (r *Runner) asyncFrom(nc *nats.Conn, busy *atomic.Int64, h micro.HandlerFunc, start bool) micro.HandlerFunc {
	return func(req micro.Request) {
		d := &detached{nc: nc, subject: req.Subject(), reply: req.Reply(),
			data: append([]byte(nil), req.Data()...), hdr: req.Headers(), at: time.Now()}
		leave := func() {}
		if start {
			leave = r.arrive(protocol.LastToken(d.subject))
		}
		busy.Add(1) // until answered: the reply must go out on nc, which took the request
		r.inFlight <- struct{}{}
		if !r.goFn(func() { defer func() { <-r.inFlight; busy.Add(-1) }(); defer leave(); h(d) }) {
			<-r.inFlight
			leave()
			r.respondError(d, errors.New("nexlet is shutting down"), nil)
			busy.Add(-1)
		}
	}
}

// serveLocal takes start requests from the local channel until the node's end closes
// (that nexd exited: a nexd that adopts this nexlet sends them over NATS) or Shutdown.
// Each is handled as one from NATS is (async), and answered on the channel.
func (r *Runner) serveLocal(local *localchan.Server, done chan struct{}, agentID string) {
	defer close(done)
	defer r.localFeedsGone(local)
	prefix := protocol.AgentPrefix(r.nodeID) + "." + agentID + ".STARTWORKLOAD."
	err := local.Serve(func(lr *localchan.Request) {
		d := &detached{subject: lr.Subject, reply: "local", data: lr.Data, hdr: micro.Headers(lr.Header), local: lr, at: time.Now()}
		if !strings.HasPrefix(lr.Subject, prefix) || protocol.LastToken(lr.Subject) == "" {
			r.respondError(d, fmt.Errorf("local channel: no endpoint for %q", lr.Subject), nil)
			return
		}
		// The reader never waits for a free slot: a node's write waits at most
		// localchan.WriteWait, so requests queue in goroutines, not in the socket.
		leave := r.arrive(protocol.LastToken(lr.Subject)) // held from here (arriving)
		if !r.goFn(func() {
			defer leave()
			r.inFlight <- struct{}{}
			defer func() { <-r.inFlight }()
			r.handleStart(d)
		}) {
			leave()
			r.respondError(d, errors.New("nexlet is shutting down"), nil)
		}
	})
	if err != nil {
		r.log.Warn("local channel to the node failed; start requests come over NATS", "err", err)
		return
	}
	r.log.Debug("local channel to the node closed; start requests come over NATS")
}

// detached is a micro.Request answered directly on the connection (or on the local
// channel it came from).
type detached struct {
	nc             *nats.Conn
	subject, reply string
	data           []byte
	hdr            micro.Headers
	local          *localchan.Request
	at             time.Time // when it arrived
}

func (d *detached) Respond(b []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Data: b}
	for _, o := range opts {
		o(m)
	}
	return d.publish(m)
}

func (d *detached) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		return micro.ErrMarshalResponse
	}
	return d.Respond(b, opts...)
}

func (d *detached) Error(code, description string, data []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Header: nats.Header{micro.ErrorHeader: {description}, micro.ErrorCodeHeader: {code}}}
	for _, o := range opts {
		o(m)
	}
	m.Data = data
	return d.publish(m)
}

func (d *detached) publish(m *nats.Msg) error {
	if d.local != nil {
		return d.local.Reply(m)
	}
	if d.reply == "" {
		return nats.ErrMsgNoReply
	}
	m.Subject = d.reply
	return d.nc.PublishMsg(m)
}

func (d *detached) Data() []byte           { return d.data }
func (d *detached) Headers() micro.Headers { return d.hdr }
func (d *detached) Subject() string        { return d.subject }
func (d *detached) Reply() string          { return d.reply }

func (r *Runner) respondError(req micro.Request, err error, body any, opts ...micro.RespondOpt) {
	var data []byte
	if body != nil {
		data, _ = json.Marshal(body)
	}
	code := ErrorCode
	if errors.As(err, new(badRequest)) {
		code = BadRequestCode
	}
	if rerr := req.Error(code, err.Error(), data, opts...); rerr != nil {
		r.log.Warn("nexlet reply failed", "subject", req.Subject(), "err", rerr)
	}
}

func (r *Runner) respond(req micro.Request, body []byte, opts ...micro.RespondOpt) {
	if err := req.Respond(body, opts...); err != nil {
		r.log.Warn("nexlet reply failed", "subject", req.Subject(), "err", err)
	}
}

func (r *Runner) respondJSON(req micro.Request, v any, opts ...micro.RespondOpt) {
	if err := req.RespondJSON(v, opts...); err != nil {
		r.log.Warn("nexlet reply failed", "subject", req.Subject(), "err", err)
	}
}

func (r *Runner) handleStart(req micro.Request) {
	id := protocol.LastToken(req.Subject())
	var st *steps.Timer // at debug level: the runner's share of a start
	local := false
	if d, ok := req.(*detached); ok {
		st, local = steps.StartAt(r.log, d.at), d.local != nil
	}
	st.Step("wait") // arrival to this goroutine
	var in protocol.AgentStartWorkloadRequest
	if err := protocol.Decode(req.Data(), &in); err != nil {
		r.respondError(req, BadRequest(err), protocol.StartWorkloadResponse{ID: id})
		return
	}
	rep := r.reportProgress(req)
	st.Step("decode")
	held := r.holdHeartbeat() // testhold.HeartbeatLate only
	var (
		out *protocol.StartWorkloadResponse
		err error
	)
	if ps, ok := r.agent.(ProgressStarter); ok {
		out, err = ps.StartWorkloadProgress(id, &in, rep.report)
	} else {
		out, err = r.agent.StartWorkload(id, &in, false)
	}
	rep.stop()
	st.Step("start")
	var answered time.Time
	if held != nil {
		answered = time.Now() // before the answer leaves: no later than the node keeps it
	}
	if err != nil {
		r.respondError(req, err, protocol.StartWorkloadResponse{ID: id, Name: in.Request.Name})
		held.answer(answered)
		return
	}
	r.respondJSON(req, out)
	held.answer(answered)
	st.Step("reply")
	if sr, ok := r.agent.(StartReplier); ok {
		sr.StartReplied(id)
		st.Step("replied")
	}
	st.Log(r.log, "runner steps", "workload_id", id, "local", local)
}

// startReports tells a node that asked for it (protocol.HeaderProgress) how a start
// goes, so a slow start (an artifact download) is not given up on: the latest report
// (else "starting") every interval the node named, and the agent's own reports as they
// come (byte counts at most every ProgressEvery). Nothing is sent once stop returned.
// The repeats come from a timer, not a goroutine of their own: a start that ends
// within the interval (nearly all) then costs no goroutine to start and none to wait
// for at its end, on the deploy's path.
type startReports struct {
	r     *Runner
	req   micro.Request
	pub   func(*nats.Msg) error // sends a report (nil: nowhere to)
	every time.Duration
	timer *time.Timer

	mu     sync.Mutex
	closed bool
	last   protocol.Progress
	sentAt time.Time // of the last byte count sent
}

func (r *Runner) reportProgress(req micro.Request) *startReports {
	s := &startReports{r: r, req: req, last: protocol.Progress{Text: "starting"}}
	every, err := time.ParseDuration(req.Headers().Get(protocol.HeaderProgress))
	if nc := r.NC(); nc != nil {
		s.pub = nc.PublishMsg
	}
	if d, ok := req.(*detached); ok {
		s.pub = d.publish // reports are replies: they leave the way the request came
	}
	if err != nil || every <= 0 || req.Reply() == "" || s.pub == nil {
		s.closed = true // the node did not ask: reports go nowhere
		return s
	}
	s.every = every
	s.mu.Lock()
	defer s.mu.Unlock()
	s.timer = time.AfterFunc(every, s.tick)
	return s
}

// tick repeats the latest report and sets the timer for the next.
func (s *startReports) tick() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.sendLocked()
	s.timer.Reset(s.every)
}

// report is the agent's report of how its start goes.
func (s *startReports) report(p protocol.Progress) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	prev := s.last
	s.last = p
	switch {
	case p.Text != prev.Text || p.HasBytes() != prev.HasBytes():
	case !p.HasBytes() || p == prev:
		return // nothing new; the ticker repeats it
	case p.Total > 0 && p.Done >= p.Total:
	case time.Since(s.sentAt) < ProgressEvery:
		return
	}
	s.sendLocked()
}

func (s *startReports) sendLocked() {
	m := &nats.Msg{Subject: s.req.Reply(), Header: nats.Header{protocol.HeaderProgress: {s.last.Text}}}
	if s.last.HasBytes() {
		m.Header.Set(protocol.HeaderProgressBytes, protocol.FormatProgressBytes(s.last.Done, s.last.Total))
		s.sentAt = time.Now()
	}
	if err := s.pub(m); err != nil {
		s.r.log.Debug("start progress report failed", "subject", s.req.Subject(), "err", err)
	}
}

// stop ends the reports. A tick that runs concurrently holds the lock while it sends,
// so none is being sent once stop returned, and any later tick finds it closed.
func (s *startReports) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	if s.timer != nil {
		s.timer.Stop()
	}
}

func (r *Runner) handleStop(req micro.Request) {
	id := protocol.LastToken(req.Subject())
	resp := protocol.StopWorkloadResponse{ID: id, WorkloadType: r.registerType(), Stopped: true}
	var in protocol.StopWorkloadRequest
	err := protocol.Decode(req.Data(), &in)
	r.mu.Lock()
	rw, replaying := r.replaying[id]
	r.mu.Unlock()
	if replaying {
		// Its replay adopts (or starts) it: stopped now, the agent would not find it
		// and the replay would then run it on (TestStopWhileReplaying).
		<-rw.done
	}
	if err == nil {
		if sr, ok := r.agent.(StopRecorder); ok && in.RecordAck {
			resp.Message, err = sr.StopWorkloadRecorded(id, &in, r.stopRecorded(req))
		} else if sr, ok := r.agent.(StopReporter); ok {
			resp.Message, err = sr.StopWorkloadReport(id, &in)
		} else {
			err = r.agent.StopWorkload(id, &in)
		}
	}
	if sr, ok := r.agent.(StopRecaller); ok && err != nil && err.Error() == protocol.ErrTextWorkloadNotFound {
		if at, how, ok := sr.StoppedBefore(id, in.Namespace); ok {
			r.respondJSON(req, stopmemo.Entry{Type: resp.WorkloadType, How: how, At: at}.Answer(id))
			return
		}
	}
	if err != nil {
		resp.Stopped, resp.Message = false, err.Error()
		r.respondError(req, err, resp)
		return
	}
	r.respondJSON(req, resp)
}

// stopRecorded returns what tells the node, once, that the stop req asked for is
// recorded: a body-less reply carrying HeaderStopRecorded, on the request's reply
// subject (the nexlet's own, on its direct subject), ahead of the answer.
func (r *Runner) stopRecorded(req micro.Request) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			if req.Reply() == "" {
				return
			}
			h := micro.Headers{protocol.HeaderStopRecorded: {r.AgentID()}}
			if err := req.Respond(nil, micro.WithHeaders(h)); err != nil {
				r.log.Warn("could not tell the node a stop is recorded", "subject", req.Subject(), "err", err)
			}
		})
	}
}

// getRequest is what GETWORKLOAD may carry: a clone's namespace and target xkey. Any
// body decodes; unknown shapes are treated as empty.
type getRequest struct {
	Namespace     string `json:"namespace"`
	NewTargetXKey string `json:"new_target_xkey"`
}

func (r *Runner) handleGet(req micro.Request) {
	id := protocol.LastToken(req.Subject())
	var in getRequest
	if body := bytes.TrimSpace(req.Data()); len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			r.respondError(req, fmt.Errorf("invalid GETWORKLOAD request: %w", err), nil)
			return
		}
	}
	out, err := r.agent.GetWorkload(id, in.NewTargetXKey)
	if err != nil {
		if err.Error() == protocol.ErrTextWorkloadNotFound {
			return // silence: another nexlet of the node may hold it
		}
		r.respondError(req, err, nil)
		return
	}
	if in.Namespace != "" && in.Namespace != protocol.SystemNamespace && in.Namespace != out.Namespace {
		return // not visible from that namespace
	}
	r.respondJSON(req, out)
}

// queryOn answers QUERYWORKLOADS taken on nc (handleQuery), whose server's max_payload
// bounds each message of the answer.
func (r *Runner) queryOn(nc *nats.Conn) micro.HandlerFunc {
	return func(req micro.Request) { r.handleQuery(nc.MaxPayload()-listHeadroom, req) }
}

// listHeadroom is what an answer to QUERYWORKLOADS leaves of the server's max_payload
// for its headers (this nexlet's id, the part's number, the status line): nats-server
// bounds body and headers only together.
const listHeadroom = 4096

// handleQuery answers QUERYWORKLOADS, naming this nexlet (HeaderAgentID) so the node
// can tell which of its nexlets did not answer. A list of more than budget bytes goes
// in parts (HeaderListPart) when the node takes them (HeaderListParts): in one
// message, a list of 2,000-3,000 workloads exceeded the default 1 MB, the publish
// failed, and the node's list lacked every workload of this nexlet (and its shutdown
// stopped none of them).
func (r *Runner) handleQuery(budget int64, req micro.Request) {
	self := micro.WithHeaders(micro.Headers{protocol.HeaderAgentID: []string{r.AgentID()}})
	var in protocol.AgentListWorkloadsRequest
	if err := protocol.Decode(req.Data(), &in); err != nil {
		r.respondError(req, err, nil, self)
		return
	}
	// Taken before the agent's list: a workload whose replay ends in between is in
	// both (the agent's row wins), never in neither.
	r.mu.Lock()
	replaying := make(map[string]protocol.StartWorkloadRequest, len(r.replaying))
	for id, rw := range r.replaying {
		replaying[id] = rw.req
	}
	r.mu.Unlock()
	out, err := r.agent.QueryWorkloads(in.Namespace, in.Filter)
	if err != nil {
		r.respondError(req, err, nil, self)
		return
	}
	if out == nil {
		out = []protocol.WorkloadSummary{}
	}
	list := withReplaying(out, replaying, in)
	body, err := json.Marshal(list)
	if err != nil {
		r.respondError(req, fmt.Errorf("encode the workload list: %w", err), nil, self)
		return
	}
	if int64(len(body)) <= budget {
		r.respond(req, body, self)
		return
	}
	if req.Headers().Get(protocol.HeaderListParts) == "" {
		r.respondError(req, fmt.Errorf("the list of %d workloads is %d bytes, over the %d one message may carry here (NATS max_payload), and the node does not take it in parts",
			len(list), len(body), budget), nil, self)
		return
	}
	parts, err := splitList(list, budget)
	if err != nil {
		r.respondError(req, err, nil, self)
		return
	}
	for i, p := range parts {
		part := micro.WithHeaders(micro.Headers{protocol.HeaderListPart: {strconv.Itoa(i+1) + "/" + strconv.Itoa(len(parts))}})
		if err := req.Respond(p, self, part); err != nil {
			r.log.Warn("nexlet reply failed", "subject", req.Subject(), "part", i+1, "parts", len(parts), "err", err)
			return
		}
	}
}

// splitList encodes list as JSON arrays of at most budget bytes each, rows in order.
func splitList(list []protocol.WorkloadSummary, budget int64) ([][]byte, error) {
	var parts [][]byte
	cur := []byte{'['}
	for _, w := range list {
		row, err := json.Marshal(w)
		if err != nil {
			return nil, fmt.Errorf("encode the list row of workload %s: %w", w.ID, err)
		}
		if int64(len(row))+2 > budget {
			return nil, fmt.Errorf("the list row of workload %s alone is %d bytes, over the %d one message may carry here (NATS max_payload)", w.ID, len(row), budget)
		}
		if len(cur) > 1 && int64(len(cur)+len(row)+2) > budget {
			parts = append(parts, append(cur, ']'))
			cur = []byte{'['}
		}
		if len(cur) > 1 {
			cur = append(cur, ',')
		}
		cur = append(cur, row...)
	}
	return append(parts, append(cur, ']')), nil
}

// withReplaying adds to a list the workloads still replaying (state starting) that it
// lacks, as in asks for them. A list asked while a restarted nexlet replays the node's
// stored workloads lists them all: before, only those replayed so far (e2e
// TestListDuringReplayIsWhole: 0 to 99 of 100 rows in lists the node took as whole).
func withReplaying(out []protocol.WorkloadSummary, replaying map[string]protocol.StartWorkloadRequest, in protocol.AgentListWorkloadsRequest) []protocol.WorkloadSummary {
	if len(replaying) == 0 {
		return out
	}
	have := make(map[string]bool, len(out))
	for _, w := range out {
		have[w.ID] = true
	}
	for _, id := range slices.Sorted(maps.Keys(replaying)) {
		w := replaying[id]
		if have[id] || (in.Namespace != protocol.SystemNamespace && in.Namespace != w.Namespace) ||
			(len(in.Filter) > 0 && !slices.Contains(in.Filter, id) && !slices.Contains(in.Filter, w.Name)) {
			continue
		}
		ns := w.Namespace
		tags := maps.Clone(w.Tags)
		if tags == nil {
			tags = map[string]string{}
		}
		out = append(out, protocol.WorkloadSummary{ID: id, Name: w.Name, Namespace: &ns, Runtime: "--",
			Tags: tags, WorkloadLifecycle: string(w.WorkloadLifecycle), WorkloadState: protocol.WorkloadStarting,
			WorkloadType: w.WorkloadType, Metadata: map[string]string{"replaying": "true"}})
	}
	return out
}

func (r *Runner) handlePing(req micro.Request) {
	out, err := r.agent.Ping()
	if err != nil {
		r.respondError(req, err, nil)
		return
	}
	r.respondJSON(req, out, micro.WithHeaders(micro.Headers{protocol.HeaderAgentID: []string{r.AgentID()}}))
}

func (r *Runner) handleLameduck(req micro.Request) {
	var in protocol.LameduckRequest
	err := protocol.Decode(req.Data(), &in)
	var d time.Duration
	if err == nil {
		d, err = in.ParseDelay()
	}
	if err == nil {
		err = r.agent.SetLameduck(d)
	}
	if err != nil {
		r.respondError(req, err, protocol.LameduckResponse{Message: err.Error()})
		return
	}
	r.respondJSON(req, protocol.LameduckResponse{Success: true, Message: "lameduck set"})
}

func (r *Runner) registerType() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.regType
}
