// Package node is the node side of the $NEX protocol: the "nexnode" micro service
// (ping, info, tags, lameduck, auction, deploy, undeploy, clone, list), the registry of
// nexlets with their health, the node heartbeat and the node's events. The daemon
// owns the NATS connection, the credential minter, the state store and the nexlet
// processes, and wires them in through Options.
package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/nkeysign"
	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/internal/stopmemo"
	"github.com/nexd-project/nexd/protocol"
)

// Minter issues the NATS credentials handed to nexlets and workloads.
type Minter interface {
	// MintRegister returns the credentials a nexlet uses to register.
	MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error)
	// MintAgent returns a registered nexlet's own credentials; direct: with a publish
	// grant on every namespace's $NEX.FEED (allow_nexlet_direct_feeds).
	MintAgent(agentID, nodeID string, direct bool) (protocol.NatsConnectionData, error)
	// MintWorkload returns a workload's credentials, scoped to its namespace.
	MintWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error)
	// WorkloadNamespaceFits reports whether a workload minted in namespace gets
	// credentials within protocol.MaxWorkloadCredentials (the deploy refuses it
	// otherwise): the node does not bid where it does not. Allocation-free.
	WorkloadNamespaceFits(namespace string) bool
	// RenewWorkload returns fresh credentials of a running workload, in its namespace.
	RenewWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error)
	// RenewAgent signs a fresh user of nexlet agentID for userPub, a public user nkey
	// the nexlet made (the reply carries no seed); an error wrapping
	// mint.ErrRenewalUnsupported where nexlet users do not expire.
	RenewAgent(agentID, nodeID, userPub string, direct bool) (protocol.NatsConnectionData, error)
	// RevokeSuperseded revokes a workload's users older than its newest, where the
	// minter can revoke (an error wrapping an unsupported revocation otherwise).
	RevokeSuperseded(ctx context.Context, workloadID string) error
	// RevokeAgentBefore revokes a nexlet's users minted before userPub (once it
	// switched to userPub, or registered and got userPub), where the minter can revoke.
	RevokeAgentBefore(ctx context.Context, agentID, userPub string) error
	// CanMint reports whether an issuer is configured. Without one, remote
	// registration is refused: a remote nexlet would get no usable identity.
	CanMint() bool
	// PrivateInboxes reports whether each minted user may subscribe only to its own
	// inbox (protocol.InboxPrefix of its id): the node then replies to a nexlet only
	// there, and never into an inbox anyone else could read.
	PrivateInboxes() bool
}

// Options configure a Node. NC, NodeKey, XKey and Minter are required.
type Options struct {
	NC      *nats.Conn
	NodeKey nkeys.KeyPair // server nkey; its public key is the node id
	XKey    nkeys.KeyPair // curve key, published as the node's xkey

	Name, Nexus                string
	Version, Commit, BuildDate string
	Tags                       map[string]string // user tags; the nex. prefix is reserved

	AuctionTTL time.Duration // how long a bid can be deployed to (default 10s)
	// MaxBids and MaxBidsPerNamespace bound the pending bids (defaults DefaultMaxBids
	// and DefaultMaxBidsPerNamespace); the oldest is evicted first.
	MaxBids, MaxBidsPerNamespace int
	AllowRemoteRegistration      bool
	// AllowDirectFeeds (allow_nexlet_direct_feeds) grants the nexlets that cannot
	// relay their feeds (upstream's SDK; a supervised nexlet older than the relay) a
	// publish grant on every namespace's $NEX.FEED, as before the relay. Off, their
	// feeds are refused by the server: any of them could forge another's.
	AllowDirectFeeds bool
	// RemoteNexlets are the only remote nexlets that may register: each signs its
	// registration with the key listed here, under the name and type listed here.
	RemoteNexlets []RemoteNexlet
	// TrustedNodes, when set, are the only node ids whose signed bids CLONE re-seals
	// an environment to (trusted_nodes): a signature proves a node id, not that it is
	// one of ours.
	TrustedNodes []string

	Minter Minter
	Store  Store // default NoStore
	// CanPlace, when set, is asked before every deploy; an error refuses the deploy as
	// not started, with the error as the reason (a full disk under the state directory).
	CanPlace func() error
	// CanBid, when set, is asked before every bid (it must be cheap); an error means
	// no bid (the node's state store cut off from its JetStream quorum).
	CanBid  func() error
	Emitter Emitter // default NoEmitter
	Logger  *slog.Logger

	HeartbeatInterval  time.Duration // node heartbeat period (default 10s)
	HealthTick         time.Duration // how often agent health is swept (default 5s)
	DegradedAfter      time.Duration // agent silent this long: degraded (default 15s)
	OfflineAfter       time.Duration // agent silent this long: offline (default 30s)
	RemoveOfflineAfter time.Duration // offline this long: registration removed (default 60s; <0 never)
	FanoutTimeout      time.Duration // bound on STOPWORKLOAD/QUERYWORKLOADS/SETLAMEDUCK fan-outs (default 2s)
	CloneTimeout       time.Duration // bound on the GETWORKLOAD fan-out (default 3s)
	// ListMemory bounds the bytes of nexlets' answers to QUERYWORKLOADS the node holds
	// across all its lists at once (default 256 MiB; listBudget).
	ListMemory int64
	// StopWait bounds how long Stop waits, once it cancelled them, for the handlers
	// still running (default 10s): one stuck past its context must not hold the stop.
	StopWait time.Duration
	// EndsListInterval is how often the nexlets on upstream's SDK that hold workloads
	// in node state are listed to hear their workloads' ends (default 5s; listends.go).
	EndsListInterval time.Duration
	StartTimeout     time.Duration // how long a starting nexlet may stay silent (default 1m)
	RevokeGrace      time.Duration // after a renewal, until the old users are revoked (default 5s)
	DeployTimeout    time.Duration // how long a start may take while the nexlet reports progress (default 5m)
	ProgressInterval time.Duration // how often a starting nexlet is asked to report progress (default 5s)
	// LocalStarts says which starts go over a nexlet's local channel when it has one:
	// "" (all), "off" (none: NATS), "half" (each one at random with even odds, so that
	// a benchmark compares both transports under the same load; NEXD_LOCAL_STARTS).
	LocalStarts string
	// KnownSchemas are start request schemas known to compile (the native nexlet's, which
	// this binary carries): a registration sending one has it compiled later (startSchema).
	KnownSchemas []string
	// StopTimeout bounds the wait for a nexlet to confirm a stop of a workload this node
	// owns (default 5m). A nexlet answers once the workload is gone, after at most its
	// grace plus a kill, so this only bounds a nexlet that never answers.
	StopTimeout time.Duration
	// StopRecordTimeout bounds the wait for the owning nexlet's word that it recorded
	// a stop, before the node tells a client that does not wait (default 2s): see
	// stopAck.
	StopRecordTimeout time.Duration
	// DrainOutcomeFile, when set, keeps the last lame duck drain's outcome (LastDrain)
	// across the node's exit, until its next lame duck: see drainoutcome.go.
	DrainOutcomeFile string
	// AgentSwitchWait bounds how long a renewed nexlet may keep its old user: it says
	// when it switched (and the old one is revoked then); without that word the old one
	// is revoked after this (default 2m).
	AgentSwitchWait time.Duration

	// OnLameduck is called once when the node enters lame duck mode; the daemon
	// schedules the shutdown after delay. It runs on a request handler's goroutine
	// and must not block.
	OnLameduck func(delay time.Duration)

	// OnNameBound, when set, hears that the supervised nexlet supervised registered
	// under name for the first time this run, so the daemon can reserve the name for it
	// from the start of the next run (ExpectAgent's names). It runs on the
	// registration's goroutine.
	OnNameBound func(supervised, name string)

	// Observer, when set, receives measurements for metrics and workload endings.
	Observer Observer

	// WorkloadResources, when set, reads a workload's cgroup figures for a WPING that
	// asks for them (protocol.HeaderResources); ok is false for a workload it has no
	// cgroup of (a remote nexlet's, or no cgroups).
	WorkloadResources func(workloadID string) (res protocol.WorkloadResources, ok bool)

	// TestHold lists the crash windows an e2e fault test holds this node in
	// (testhold.Env; empty but in such a test).
	TestHold string
}

// Outcomes of an UNDEPLOY, as Observer.Stop gets them (nexd_stops_total's labels).
const (
	StopStopped = "stopped"
	// StopNotFound: no nexlet stopped it (none holds it, or it is still stopping).
	StopNotFound = "not_found"
	// StopAlreadyStopped: a repeat answered from the stop memory (the node's or a
	// nexlet's): stopped before, nothing stopped now.
	StopAlreadyStopped = "already_stopped"
)

// Observer is told what the node does, for metrics and clean-up. Calls must not block.
type Observer interface {
	// Auction is called after each bid, with the time it took to decide.
	Auction(d time.Duration)
	// Deploy is called for each deploy to one of this node's bids.
	Deploy(d time.Duration, ok bool)
	// Stop is called for each UNDEPLOY this node handled, with its outcome:
	// StopStopped, StopNotFound or StopAlreadyStopped.
	Stop(outcome string)
	// WorkloadEnded is called when a workload this node ran is gone for good.
	WorkloadEnded(workloadID string)
}

func (o *Options) defaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&o.AuctionTTL, 10*time.Second)
	def(&o.HeartbeatInterval, 10*time.Second)
	def(&o.HealthTick, 5*time.Second)
	// Heartbeats come every 10 s; upstream's 10 s threshold flips a healthy nexlet to
	// degraded for a moment before each late-by-a-millisecond beat, and an auction in
	// that moment gets no bid. Half an interval of slack avoids that.
	def(&o.DegradedAfter, 15*time.Second)
	def(&o.OfflineAfter, 30*time.Second)
	def(&o.RemoveOfflineAfter, 60*time.Second)
	def(&o.FanoutTimeout, 2*time.Second)
	def(&o.CloneTimeout, 3*time.Second)
	def(&o.StopWait, 10*time.Second)
	def(&o.EndsListInterval, 5*time.Second)
	def(&o.StartTimeout, time.Minute)
	def(&o.RevokeGrace, 5*time.Second)
	def(&o.AgentSwitchWait, 2*time.Minute)
	def(&o.DeployTimeout, 5*time.Minute)
	def(&o.ProgressInterval, 5*time.Second)
	def(&o.StopTimeout, 5*time.Minute)
	def(&o.StopRecordTimeout, 2*time.Second)
	if o.ListMemory <= 0 {
		o.ListMemory = defaultListMemory
	}
	o.StartTimeout = min(o.StartTimeout, o.DeployTimeout)
	if o.Name == "" {
		o.Name = "nexnode"
	}
	if o.Nexus == "" {
		o.Nexus = "nexus"
	}
	if o.Store == nil {
		o.Store = NoStore{}
	}
	if o.Emitter == nil {
		o.Emitter = NoEmitter{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Node is one nexd node on the NATS API.
type Node struct {
	o    Options
	id   string
	xpub string
	log  *slog.Logger

	mu       sync.Mutex
	state    protocol.NodeState
	userTags map[string]string
	lameduck time.Time // zero unless in lame duck mode: when workloads stop
	// drained: lame duck's drain ended without an error, so the node runs nothing and
	// its lists say so without asking nexlets that are stopping with it
	// (TestListAfterCleanDrainIsWhole).
	drained bool
	// drainState and drainReason are the drain's outcome once it ended (protocol.Drain*,
	// "" before); drainWaiters the clients to tell it (HeaderDrainWait).
	drainState, drainReason string
	drainWaiters            []drainWaiter
	// lastDrain is the last drain's outcome (nil: none, or a drain under way), as read
	// from and written to Options.DrainOutcomeFile.
	lastDrain *protocol.LastDrain
	startTime time.Time
	agents    map[string]*registration // by agent id
	// deaf is the last health sweep at which the node's own NATS connection was down:
	// a nexlet's silence until then says nothing about the nexlet.
	deaf     time.Time
	expected map[string]string // agent id -> name, pre-assigned by the daemon
	// bound maps each name a supervised nexlet registered under, and the name it is
	// supervised as, to the latter, for the run: no other nexlet may take it while that
	// one restarts (see boundLocked). current maps the latter to its agent id.
	bound   map[string]string
	current map[string]string
	// bindings counts, per supervised nexlet, the names its registrations bound in
	// this run (at most MaxBoundNames).
	bindings map[string]int
	procInfo map[string]procInfo         // by agent id, from the supervisor
	bids     *bidBook                    // bidder id -> bid, bounded
	auctions *auctionQueue               // auctions waiting for a worker
	bidBufs  sync.Pool                   // *[]byte: a bid's encoding, reused once published
	noBids   [noBidReasons]atomic.Uint64 // auctions not bid on, by reason (NotBid)
	// replySeq numbers the signed replies (protocol.HeaderSeq, signReply).
	replySeq   atomic.Uint64
	auctionSub *nats.Subscription // the AUCTION subscription, from Start on
	changed    chan struct{}      // closed and replaced whenever agents change

	svc   micro.Service
	subs  []*nats.Subscription // nexlet heartbeats, workload-ended events
	owned map[string]ownership // workload id -> type and owning nexlet, for what this node stored
	// renewed holds, per workload, the newest credentials a renewal minted for it and
	// until when a renewal gets them again instead of a new user (renew.go).
	renewed map[string]renewedCreds
	// recorded: the namespaces node state gave its workloads, read at the start (before
	// owned learns them from the nexlets' registrations).
	recorded recordedNS
	// stopped remembers the workloads whose stop a nexlet confirmed lately (bounded), so
	// a repeated stop is answered "already stopped at T", not "not found".
	stopped *stopmemo.Memo
	keys    map[string]string // agent id -> public key of the nexlet's current start
	// signed remembers the signed registrations and renewals taken (replays refused).
	signed seenSignatures
	// locals are the channels to the local nexlets' current starts (SetAgentLocal).
	locals map[string]localChannel
	// starting holds workloads whose deploy is in flight, with the nexlet instance it
	// went to; ended once that nexlet said the workload already ended (a fast job), so
	// the deploy removes it from state.
	starting map[string]inFlight
	// feeds are the workloads that ended lately, whose nexlet may still relay their
	// last lines (feedrelay.go).
	feeds feedGrace
	// handableStarts are the deploys in flight to a nexd nexlet (on its local channel
	// or over NATS), which a successor of a nexlet that ended before it answered takes
	// over (handOverStarts).
	handableStarts map[string]*startCall
	// regOrder orders the registrations of one nexlet and of one type over NATS
	// (regorder.go); regTaken and regServing bound those taken and those served at once.
	regOrder   regOrder
	regTaken   chan struct{}
	regServing chan struct{}
	// regReads are the registrations reading node state, each collecting the deploys
	// in flight from its read on (register).
	regReads map[*regRead]struct{}
	keep     bool // StopAllWorkloads ran: keep state for the next start
	ctx      context.Context
	cancel   context.CancelFunc
	loops    sync.WaitGroup    // heartbeat and health loops
	inflight sync.WaitGroup    // handlers running on their own goroutine (own)
	running  map[uint64]string // (under mu) what each of them is, for Stop's log
	runSeq   uint64
	// halted (under mu): Stop is waiting for inflight or has; own starts nothing more.
	halted   bool
	slots    chan struct{}       // bounds those goroutines
	lists    *listBudget         // the nexlets' list answers held at once
	probes   chan chan struct{}  // liveness probes, answered by the health loop
	replayed map[string]struct{} // workload ids handed to nexlets to replay
	// feedsWarned: the nexlet instances (owners) already warned that their direct
	// feeds are refused, so a restarting nexlet does not repeat it.
	feedsWarned map[string]bool
	// lastList is the last complete system-namespace listing, taken while connected,
	// and when: what status shows during a NATS outage instead of an empty answer.
	lastList   []protocol.WorkloadSummary
	lastListAt time.Time
	// changes counts what may change the node's workload listing (deploys, stops, ends,
	// registrations, a nexlet's count in its heartbeat), so that a caller polling the
	// listing (the status line) asks the nexlets again only when it may differ.
	changes atomic.Uint64
	// replyless counts the requests dropped for having no reply subject; replylessLog
	// rate-limits the warning about them.
	replyless    atomic.Uint64
	replylessLog rateLog
	// renewals bounds each nexlet's workload renewals (renew.go), apart from n.mu.
	renewals renewLimits
	// agentRenewals bounds each nexlet's renewals of its own user (renew.go), and its
	// registrations again, which reregsDropped counts apart when dropped.
	agentRenewals renewLimits
	reregsDropped atomic.Uint64
	// regChanges is changes as the last registration left it (HoldsNothing).
	regChanges uint64
	// listRound (under mu) numbers the rounds listing nexlets for ended workloads;
	// endRounds counts those done (tests wait on it).
	listRound uint64
	endRounds atomic.Uint64
	listFails [listChecks]atomic.Uint64 // failed checks of those rounds (ListChecksFailed)
	endsKick  chan struct{}             // a round soon (kickEnds)
	// stopsInFlight (under mu) counts the stops under way by workload id: a list round
	// leaves those workloads to their stop.
	stopsInFlight map[string]int
	// ownerWaits (under mu): the workloads a tenant's stop is waiting for the nexlet
	// of (awaitOwner); the tenant's other stops of one are answered at once meanwhile.
	ownerWaits map[string]bool
}

// WorkloadChanges is a counter that moves whenever the node's workload listing may
// have changed; equal values mean no deploy, stop, end, registration or change in a
// nexlet's reported count happened between them.
func (n *Node) WorkloadChanges() uint64 { return n.changes.Load() }

// HoldsNothing says whether the node's workload listing is known to be empty without
// asking the nexlets: only local nexlets may register, every one expected has, each
// said at its registration that it holds no workload, none was handed one to replay,
// and nothing changed since the last registration (changes is WorkloadChanges as the
// caller read it). A start-up's status line then needs no round trip to nexlets that
// have only just registered. A nexlet that has not registered again (an adopted one, a
// remote one) may still answer a listing: then the nexlets are asked.
func (n *Node) HoldsNothing(changes uint64) bool {
	if n.o.AllowRemoteRegistration || len(n.o.RemoteNexlets) > 0 {
		return false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if changes != n.regChanges || len(n.replayed) > 0 {
		return false
	}
	for id := range n.expected {
		if _, ok := n.agents[id]; !ok {
			return false
		}
	}
	for _, r := range n.agents {
		if r.req.Workloads == nil || len(*r.req.Workloads) > 0 {
			return false
		}
	}
	return true
}

// RemoteNexlet is a remote nexlet allowed to register (config remote_nexlets).
type RemoteNexlet struct {
	Name, Type string
	PublicKey  string // an nkey public key; the nexlet signs its registration with it
}

// ownership records which nexlet instance runs a workload: its type and owner, a stable
// identity ("local:<supervised name>" or "remote:<configured name>") that survives the
// nexlet's restarts, so a restarted nexlet gets its own workloads back and no other.
type ownership struct {
	typ, owner string
	ns         string // the workload's namespace
	name       string // the workload's name (a repeated stop by name finds it)
	// ended: its end was heard already (its nexlet's ended report, or an end while it
	// started) and is being handled there; a WORKLOADSTOPPED of it now (the node's own,
	// published from the report) must not remove it a second time.
	ended bool
}

type procInfo struct {
	restarts int
	lastExit string
	failed   bool
}

// New validates o and returns a Node that is not yet serving.
func New(o Options) (*Node, error) {
	o.defaults()
	if o.NC == nil {
		return nil, errors.New("node: options: NC (the NATS connection) is required")
	}
	if o.NodeKey == nil || o.XKey == nil {
		return nil, errors.New("node: options: NodeKey and XKey are required")
	}
	if o.Minter == nil {
		return nil, errors.New("node: options: Minter is required")
	}
	id, err := o.NodeKey.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("node: options: NodeKey: %w", err)
	}
	if !nkeys.IsValidPublicServerKey(id) {
		return nil, fmt.Errorf("node: options: NodeKey must be a server nkey (N…): %q", id)
	}
	if o.NodeKey, err = nkeysign.Cached(o.NodeKey); err != nil { // it signs every bid
		return nil, fmt.Errorf("node: options: NodeKey: %w", err)
	}
	xpub, err := o.XKey.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("node: options: XKey: %w", err)
	}
	if !nkeys.IsValidPublicCurveKey(xpub) {
		return nil, fmt.Errorf("node: options: XKey must be a curve key (X…): %q", xpub)
	}
	if !protocol.IsToken(o.Nexus) {
		return nil, fmt.Errorf("node: options: nexus %q must be one subject token of letters, digits, - or _", o.Nexus)
	}
	if err := checkUserTags(o.Tags); err != nil {
		return nil, fmt.Errorf("node: options: %w", err)
	}
	for i, rn := range o.RemoteNexlets {
		if rn.Name == "" || rn.Type == "" || !nkeys.IsValidPublicKey(rn.PublicKey) {
			return nil, fmt.Errorf("node: options: remote_nexlets[%d]: name, type and an nkey public_key are required (got %q, %q, %q)", i, rn.Name, rn.Type, rn.PublicKey)
		}
	}
	n := &Node{
		o:              o,
		id:             id,
		xpub:           xpub,
		log:            o.Logger.With("node_id", id),
		state:          protocol.NodeStarting,
		userTags:       maps.Clone(o.Tags),
		agents:         map[string]*registration{},
		expected:       map[string]string{},
		bound:          map[string]string{},
		bindings:       map[string]int{},
		current:        map[string]string{},
		procInfo:       map[string]procInfo{},
		bids:           newBidBook(o.MaxBidsPerNamespace, o.MaxBids),
		auctions:       newAuctionQueue(),
		owned:          map[string]ownership{},
		renewed:        map[string]renewedCreds{},
		recorded:       recordedNS{ns: map[string]string{}},
		stopped:        stopmemo.New(stopmemo.DefaultMax, stopmemo.DefaultAge),
		keys:           map[string]string{},
		locals:         map[string]localChannel{},
		starting:       map[string]inFlight{},
		feeds:          feedGrace{byID: map[string]feedOwner{}, stops: map[string]time.Time{}},
		handableStarts: map[string]*startCall{},
		regReads:       map[*regRead]struct{}{},
		regTaken:       make(chan struct{}, regTaken),
		regServing:     make(chan struct{}, regServing),
		changed:        make(chan struct{}),
		slots:          make(chan struct{}, 64),
		lists:          newListBudget(o.ListMemory, o.Logger.With("node_id", id)),
		probes:         make(chan chan struct{}),
		replayed:       map[string]struct{}{},
		feedsWarned:    map[string]bool{},
		endsKick:       make(chan struct{}, 1),
		stopsInFlight:  map[string]int{},
		ownerWaits:     map[string]bool{},
	}
	n.lastDrain = n.readDrainOutcome()
	return n, nil
}

func checkUserTags(tags map[string]string) error {
	for k := range tags {
		if k == "" {
			return errors.New("tags: empty tag name")
		}
		if strings.HasPrefix(k, protocol.TagPrefix) {
			return fmt.Errorf("tags: %q: the %q prefix is reserved for built-in tags", k, protocol.TagPrefix)
		}
	}
	return nil
}

// ID is the node id (the public server nkey).
func (n *Node) ID() string { return n.id }

// XKeyPublic is the node's public curve key.
func (n *Node) XKeyPublic() string { return n.xpub }

// State returns the node state.
func (n *Node) State() protocol.NodeState {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state
}

// SetState sets the node state; the daemon sets running once its nexlets registered.
func (n *Node) SetState(s protocol.NodeState) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.state = s
}

// SetTags replaces the user tags (a reload). Built-in nex.* tags are kept.
func (n *Node) SetTags(user map[string]string) error {
	if err := checkUserTags(user); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.userTags = maps.Clone(user)
	return nil
}

// Tags returns the full tag map: user tags plus the built-ins.
func (n *Node) Tags() map[string]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.tagsLocked()
}

// tagsMatchLocked is protocol.TagsMatch(want, n.tagsLocked()) without building the
// map: every auction asks it.
func (n *Node) tagsMatchLocked(want map[string]string) bool {
	for k, v := range want {
		if have, ok := n.tagLocked(k); !ok || have != v {
			return false
		}
	}
	return true
}

// tagLocked is the node's tag k as tagsLocked has it (a built-in over a user tag).
func (n *Node) tagLocked(k string) (string, bool) {
	switch k {
	case protocol.TagOS:
		return runtime.GOOS, true
	case protocol.TagArch:
		return runtime.GOARCH, true
	case protocol.TagCPUCount:
		return strconv.Itoa(runtime.GOMAXPROCS(0)), true
	case protocol.TagLameduck:
		return strconv.FormatBool(!n.lameduck.IsZero()), true
	case protocol.TagNexus:
		return n.o.Nexus, true
	case protocol.TagNode:
		return n.o.Name, true
	}
	v, ok := n.userTags[k]
	return v, ok
}

func (n *Node) tagsLocked() map[string]string {
	t := make(map[string]string, len(n.userTags)+6)
	maps.Copy(t, n.userTags)
	t[protocol.TagOS] = runtime.GOOS
	t[protocol.TagArch] = runtime.GOARCH
	t[protocol.TagCPUCount] = strconv.Itoa(runtime.GOMAXPROCS(0))
	t[protocol.TagLameduck] = strconv.FormatBool(!n.lameduck.IsZero())
	t[protocol.TagNexus] = n.o.Nexus
	t[protocol.TagNode] = n.o.Name
	return t
}

// Start registers the nexnode micro service with every endpoint, subscribes to nexlet
// heartbeats, starts the node heartbeat and the health sweep, and emits NODESTARTED.
// The state stays "starting" until the daemon calls SetState(running).
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	if n.svc != nil {
		n.mu.Unlock()
		return errors.New("node: already started")
	}
	n.startTime = time.Now()
	// The node's work outlives the caller's start context; Stop cancels it.
	n.ctx, n.cancel = context.WithCancel(context.WithoutCancel(ctx))
	n.mu.Unlock()

	// Node state's namespaces, read beside serving (below, once everything is built;
	// with thousands of records the read is tens of ms off nexd's way to READY): a
	// stop from another namespace of a workload whose nexlet has not registered again
	// waits for the read's outcome (bounded) and is then refused as for one it placed;
	// announced before anything is served, so that no stop, list or removal misses
	// it. A read that fails is tried again at such a stop.
	recordedRead := n.beginRecordedRead()
	started := false
	defer func() {
		if !started && recordedRead != nil {
			_ = n.readRecordedEnded(recordedRead, nil, errors.New("node did not start"))
		}
	}()

	version := n.o.Version
	if !regexp.MustCompile(semver).MatchString(version) {
		// micro insists on semver; the real version still goes out in ping and info.
		version = "0.0.0"
	}
	svc, err := micro.AddService(n.o.NC, micro.Config{
		Name:        protocol.ServiceName,
		Version:     version,
		Description: fmt.Sprintf("Commit: %s | Build date: %s", n.o.Commit, n.o.BuildDate),
	})
	if err != nil {
		n.cancel()
		return fmt.Errorf("node: add micro service %s: %w", protocol.ServiceName, err)
	}
	var errs []error
	for _, e := range n.endpoints() {
		qg := n.id
		if e.queue != "" {
			qg = e.queue
		}
		h := e.handle
		if e.signs {
			h = n.signing(h)
		}
		if e.async {
			h = n.async(h)
		}
		h = n.inboxOnly(h)
		errs = append(errs, svc.AddEndpoint(e.name, micro.HandlerFunc(h),
			micro.WithEndpointSubject(e.subject), micro.WithEndpointQueueGroup(qg)))
	}
	if err := errors.Join(errs...); err != nil {
		_ = svc.Stop()
		n.cancel()
		return fmt.Errorf("node: add endpoints: %w", err)
	}
	// One wildcard subscription for every nexlet's heartbeat, so a heartbeat can
	// never race a per-agent subscription; and the workload-ended events, so a
	// finished job or a given-up service leaves the node state.
	var subs []*nats.Subscription
	undo := func() {
		for _, s := range subs {
			_ = s.Unsubscribe()
		}
		_ = svc.Stop()
		n.cancel()
	}
	// Auctions: upstream's endpoint subject and queue group (the node id), bounded.
	auctions, err := n.o.NC.QueueSubscribe(protocol.AuctionSubject("*"), n.id, n.onAuction)
	if err == nil {
		subs = append(subs, auctions)
		err = auctions.SetPendingLimits(AuctionPendingMsgs, AuctionPendingBytes)
	}
	if err != nil {
		undo()
		return fmt.Errorf("node: subscribe to auctions: %w", err)
	}
	for subj, h := range map[string]nats.MsgHandler{
		protocol.AgentHeartbeatSubject(n.id, "*"):                 n.onHeartbeat,
		protocol.EventSubject("*", protocol.EventWorkloadStopped): n.onWorkloadStopped,
		protocol.FeedRelaySubject(n.id, "*", ">"):                 n.onFeedRelay,
	} {
		sub, err := n.o.NC.Subscribe(subj, h)
		if err != nil {
			undo()
			return fmt.Errorf("node: subscribe to %s: %w", subj, err)
		}
		subs = append(subs, sub)
	}
	if err := n.o.NC.Flush(); err != nil {
		undo()
		return fmt.Errorf("node: flush subscriptions: %w", err)
	}
	n.mu.Lock()
	n.svc, n.subs, n.auctionSub = svc, subs, auctions
	tags := n.tagsLocked()
	locals := maps.Clone(n.locals)
	n.mu.Unlock()
	// The native nexlet's registration on its local channel (it may be waiting there
	// already: it starts before the node) is served from here on, as over NATS.
	for id, l := range locals {
		l.c.OnCall(n.localCalls(id, l))
		l.c.OnFeed(n.localFeeds(id, l.c))
	}
	if n.o.AllowRemoteRegistration {
		n.log.Warn("remote registration enabled: nexlets elsewhere may register with this node", "nexus", n.o.Nexus)
	}

	started = true
	n.loops.Add(3 + auctionWorkers)
	go n.heartbeatLoop()
	go n.healthLoop()
	go n.endsLoop()
	for range auctionWorkers {
		go n.auctionWorker()
	}
	if recordedRead != nil {
		n.loops.Add(1)
		go func() {
			defer n.loops.Done()
			ctx, cancel := context.WithTimeout(n.ctx, n.o.FanoutTimeout)
			defer cancel()
			if err := n.readRecorded(ctx, recordedRead); err != nil && n.ctx.Err() == nil {
				n.log.Warn("failed to read node state at start; tried again at the first stop that needs it", "err", err)
			}
		}()
	}

	n.o.Emitter.Emit(n.id, protocol.EventNodeStarted, protocol.NodeStartedEvent{
		ID: n.id, Name: n.o.Name, Nexus: n.o.Nexus, Tags: tags, Type: protocol.NodeStartedEventType,
	})
	n.log.Info("node API serving", "name", n.o.Name, "nexus", n.o.Nexus)
	return nil
}

// semver is micro's version rule, kept here to decide before AddService fails; compiled
// where it is used, once a start, not by the package's init (which the native nexlet runs
// too).
const semver = `^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`

// Stop stops the micro service and the loops, waits (bounded by ctx) for handlers in
// flight, and emits NODESTOPPED. It leaves the connection open: the daemon owns it.
func (n *Node) Stop(ctx context.Context) error {
	n.mu.Lock()
	svc, subs := n.svc, n.subs
	n.svc, n.subs = nil, nil
	n.state = protocol.NodeStopping
	n.halted = svc != nil
	n.mu.Unlock()
	if svc == nil {
		return nil
	}
	var errs []error
	if err := svc.Stop(); err != nil {
		errs = append(errs, fmt.Errorf("node: stop micro service: %w", err))
	}
	for _, sub := range subs {
		if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			errs = append(errs, fmt.Errorf("node: unsubscribe %s: %w", sub.Subject, err))
		}
	}
	n.cancel()
	done := make(chan struct{})
	go func() {
		n.loops.Wait()
		n.inflight.Wait()
		close(done)
	}()
	// Bounded: the stop runs under a context without cancellation (daemon), and a
	// handler that does not heed n.ctx would otherwise hold it for as long as it runs.
	bound := time.NewTimer(n.o.StopWait)
	defer bound.Stop()
	select {
	case <-done:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("node: waiting for handlers in flight: %w", ctx.Err()))
	case <-bound.C:
		left := n.runningNow()
		n.log.Error("stopping: gave up waiting for request handlers still running", "after", n.o.StopWait, "count", len(left), "handlers", left)
		errs = append(errs, fmt.Errorf("node: %d request handler(s) still running %s after the stop cancelled them, left behind: %s",
			len(left), n.o.StopWait, strings.Join(left, ", ")))
	}
	// A client waiting for a drain that never ran (nexd stopped during the delay) is
	// told so rather than left to guess from the node's silence.
	n.tellDrain(protocol.DrainFailed, "the node stopped before its lame duck drain ran")
	n.o.Emitter.Emit(n.id, protocol.EventNodeStopped, protocol.NodeStoppedEvent{ID: n.id})
	return errors.Join(errs...)
}

// async runs h on its own goroutine, so a slow request (a deploy waits up to a minute
// for its nexlet) does not hold up the endpoint; when too many run, h runs inline,
// which pushes back on the sender.
// inboxOnly drops a request whose reply subject is not an inbox. The node answers with
// its own, wide permissions, so a reply subject of the requester's choosing would let a
// tenant make the node publish where the tenant may not (another namespace's subjects,
// $NEX.FEED events): requests must come from an inbox, as every NATS client's do
// ("_INBOX." by default, "_INBOX_<id>." for nexd's children).
//
// A request with no reply subject at all is dropped too, before any work: no client
// of the node sends one (upstream's and nexctl's all wait for an answer), the node
// could tell no one the outcome, and each answer's failure was a warning in the
// journal, so that anyone on the bus filled it at the rate they published (and a
// reply-less LAMEDUCK or UNDEPLOY was still carried out). The drops are counted and
// warned of at most once a minute (TestAttackReplylessRequests).
func (n *Node) inboxOnly(h func(micro.Request)) func(micro.Request) {
	return func(r micro.Request) {
		if r.Reply() == "" {
			n.dropReplyless(r.Subject())
			return
		}
		if rep := r.Reply(); !isInbox(rep) {
			n.log.Debug("request dropped: its reply subject is not an inbox", "subject", r.Subject(), "reply", rep)
			return
		}
		h(r)
	}
}

// replylessWarnEvery bounds how often dropped reply-less requests are warned of.
const replylessWarnEvery = time.Minute

// dropReplyless counts a request dropped for having no reply subject and warns of the
// drops at most once per replylessWarnEvery: anyone on the bus may send them.
func (n *Node) dropReplyless(subject string) {
	total := n.replyless.Add(1)
	if ok, held := n.replylessLog.allow(time.Now(), replylessWarnEvery); ok {
		n.log.Warn("requests without a reply subject dropped unanswered and not carried out",
			"subject", subject, "dropped", held+1, "dropped_total", total, "next_warning_in", replylessWarnEvery.String())
	}
}

// ReplylessDropped counts the requests dropped for having no reply subject.
func (n *Node) ReplylessDropped() uint64 { return n.replyless.Load() }

// rateLog lets a warning through at most once per interval; the times it was held
// back are counted and said with the next one.
type rateLog struct {
	mu   sync.Mutex
	next time.Time
	held uint64
}

// allow says whether to log now and, when it does, how many were held back since.
func (l *rateLog) allow(now time.Time, every time.Duration) (ok bool, held uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Before(l.next) {
		l.held++
		return false, 0
	}
	held, l.held, l.next = l.held, 0, now.Add(every)
	return true, held
}

func isInbox(subject string) bool {
	return strings.HasPrefix(subject, "_INBOX.") || strings.HasPrefix(subject, "_INBOX_")
}

func (n *Node) async(h func(micro.Request)) func(micro.Request) {
	return func(r micro.Request) {
		select {
		case n.slots <- struct{}{}:
		default:
			h(r)
			return
		}
		// micro's request must not be touched once the callback returns (it reads
		// its fields for stats), so the goroutine answers through a copy.
		d := &detachedRequest{nc: n.o.NC, subject: r.Subject(), reply: r.Reply(), data: r.Data(), headers: r.Headers()}
		if !n.own(d.subject, func() { defer func() { <-n.slots }(); h(d) }) {
			<-n.slots
			h(r)
		}
	}
}

// own runs f on a goroutine Stop waits for (inflight), and reports whether it did:
// not once Stop began. A handler NATS was still running when Stop unsubscribed (it does
// not wait for them) started one anyway: an inflight.Add at zero concurrent with Stop's
// Wait (WaitGroup misuse: the Wait may return first, or panic), and the goroutine ran
// on after Stop returned (TestNoGoroutineAfterStop). Stop sets halted under the lock
// before it waits, so every Add here happens before that Wait.
// what names it in Stop's log should Stop give up waiting for it.
func (n *Node) own(what string, f func()) bool {
	n.mu.Lock()
	if n.halted {
		n.mu.Unlock()
		return false
	}
	n.inflight.Add(1)
	n.runSeq++
	seq := n.runSeq
	if n.running == nil {
		n.running = map[uint64]string{}
	}
	n.running[seq] = what
	n.mu.Unlock()
	go func() {
		defer n.inflight.Done()
		defer func() {
			n.mu.Lock()
			delete(n.running, seq)
			n.mu.Unlock()
		}()
		f()
	}()
	return true
}

// runningNow lists what the goroutines of own still running are, oldest first.
func (n *Node) runningNow() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	seqs := slices.Sorted(maps.Keys(n.running))
	out := make([]string, len(seqs))
	for i, q := range seqs {
		out[i] = n.running[q]
	}
	return out
}

// detachedRequest is a micro.Request that replies on the node's connection.
type detachedRequest struct {
	nc             *nats.Conn
	subject, reply string
	data           []byte
	headers        micro.Headers
	steps          *steps.Timer // from its arrival (debug logging only)
}

func (d *detachedRequest) Respond(b []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Subject: d.reply, Data: b}
	for _, o := range opts {
		o(m)
	}
	if d.reply == "" {
		return errors.New("request has no reply subject")
	}
	return d.nc.PublishMsg(m)
}

func (d *detachedRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("%w: %w", micro.ErrMarshalResponse, err)
	}
	return d.Respond(b, opts...)
}

func (d *detachedRequest) Error(code, desc string, data []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Subject: d.reply, Data: data, Header: nats.Header{}}
	for _, o := range opts {
		o(m)
	}
	m.Header.Set(protocol.HeaderErrorCode, code)
	m.Header.Set(protocol.HeaderError, desc)
	if d.reply == "" {
		return errors.New("request has no reply subject")
	}
	return d.nc.PublishMsg(m)
}

func (d *detachedRequest) Data() []byte           { return d.data }
func (d *detachedRequest) Headers() micro.Headers { return d.headers }
func (d *detachedRequest) Subject() string        { return d.subject }
func (d *detachedRequest) Reply() string          { return d.reply }

func (n *Node) heartbeatLoop() {
	defer n.loops.Done()
	t := time.NewTicker(n.o.HeartbeatInterval)
	defer t.Stop()
	for {
		n.publishHeartbeat()
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (n *Node) publishHeartbeat() {
	n.mu.Lock()
	hb := protocol.NodeHeartbeat{Registrations: n.registrationsLocked(), State: n.state}
	n.mu.Unlock()
	b, err := protocol.Marshal(hb)
	if err == nil {
		err = n.o.NC.Publish(protocol.NodeHeartbeatSubject(n.id), b)
	}
	if err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		n.log.Warn("failed to publish node heartbeat", "err", err)
	}
}

func (n *Node) healthLoop() {
	defer n.loops.Done()
	t := time.NewTicker(n.o.HealthTick)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case now := <-t.C:
			n.sweep(now)
			n.warnAuctionDrops()
		case answer := <-n.probes:
			// Through the node's lock too: a loop stuck on it does not answer.
			n.mu.Lock()
			stopping := n.state == protocol.NodeStopping
			n.mu.Unlock()
			if !stopping {
				close(answer)
			}
		}
	}
}

// AuctionDrops returns how many auctions the node dropped since it was built, by
// namespace: the namespaces past the first 256 that dropped under AuctionDropsOther,
// and those nats.go dropped before the node saw their namespace (its subscription's
// pending list full) under AuctionDropsUnsorted, and those refused for a namespace
// that is not valid under AuctionDropsInvalid.
func (n *Node) AuctionDrops() map[string]uint64 {
	d, _ := n.auctionDrops()
	return d
}

// auctionDrops is AuctionDrops and how many of the queue's were refused for their size.
func (n *Node) auctionDrops() (map[string]uint64, uint64) {
	d, tooLarge := n.auctions.dropsTooLarge()
	n.mu.Lock()
	sub := n.auctionSub
	n.mu.Unlock()
	if sub != nil {
		if blind, err := sub.Dropped(); err == nil && blind > 0 {
			d[AuctionDropsUnsorted] = uint64(blind)
		}
	}
	return d, tooLarge
}

// Replayed returns the ids of the workloads the node handed its nexlets to replay
// (from node state, when they registered) that it still holds: not one that ended
// since and left node state (a stop under way at its nexlet's registration that ended
// then), which nothing will list again (TestReplayedEndedNotWaitedFor).
func (n *Node) Replayed() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]string, 0, len(n.replayed))
	for id := range n.replayed {
		if _, held := n.owned[id]; held {
			out = append(out, id)
		}
	}
	return out
}

// Alive is the node's liveness probe: it returns nil once the health loop answered
// (through the node's lock), or an error when ctx ends first (a stuck loop, or a node
// not serving). It says nothing about NATS: the node works while NATS is away.
func (n *Node) Alive(ctx context.Context) error {
	answer := make(chan struct{})
	select {
	case n.probes <- answer:
	case <-ctx.Done():
		return fmt.Errorf("node: the health loop did not take the probe (stuck, or not running): %w", ctx.Err())
	}
	select {
	case <-answer:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("node: the health loop did not answer the probe: %w", ctx.Err())
	}
}

// Ping answers like a PING request without a filter.
func (n *Node) Ping() protocol.NodePingResponse {
	n.mu.Lock()
	defer n.mu.Unlock()
	return protocol.NodePingResponse{
		AgentCount: len(n.agents),
		NodeID:     n.id,
		StartTime:  n.startTime.UTC(),
		State:      n.state,
		Tags:       n.tagsLocked(),
		Version:    n.o.Version,
		XKey:       n.xpub,
	}
}

// Info answers like an INFO request.
func (n *Node) Info() protocol.NodeInfoResponse {
	notBid := n.NotBid() // takes the lock itself
	var tombs []Tombstone
	if ts, ok := n.o.Store.(*Tombstones); ok {
		tombs = ts.List()
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return protocol.NodeInfoResponse{
		LastDrain:          n.lastDrainLocked(),
		Tombstones:         tombs[:min(len(tombs), protocol.MaxInfoTombstones)],
		TombstoneCount:     len(tombs),
		AuctionsNotBid:     notBid,
		NodeAgentSummaries: n.summariesLocked(time.Now()),
		NodeID:             n.id,
		Tags:               n.tagsLocked(),
		Uptime:             time.Since(n.startTime).Truncate(time.Millisecond).String(),
		Version:            n.o.Version,
		XKey:               n.xpub,
	}
}

// ErrStopping is returned by EnterLameduck once the node is stopping.
var ErrStopping = errors.New("node is stopping")

// EnterLameduck puts the node in lame duck mode: it stops bidding and refuses deploys
// at once (tag nex.lameduck=true), tells its nexlets, emits NODELAMEDUCKSET and calls
// OnLameduck so the daemon stops after delay. A second call returns the first
// deadline and changes nothing.
func (n *Node) EnterLameduck(delay time.Duration) (time.Time, error) {
	if delay < 0 {
		return time.Time{}, fmt.Errorf("lameduck delay %s must not be negative", delay)
	}
	n.mu.Lock()
	if n.state == protocol.NodeStopping {
		n.mu.Unlock()
		return time.Time{}, ErrStopping
	}
	if !n.lameduck.IsZero() {
		until := n.lameduck
		n.mu.Unlock()
		return until, nil
	}
	until := time.Now().Add(delay)
	n.lameduck = until
	n.state = protocol.NodeLameduck
	ctx := n.ctx
	n.lastDrain = nil // a new drain: the last one's outcome is kept until now
	n.mu.Unlock()
	n.forgetDrainOutcome()

	n.log.Info("node entering lameduck mode", "delay", delay.String(), "until", until.Format(time.RFC3339))
	n.o.Emitter.Emit(n.id, protocol.EventNodeLameduckSet, protocol.NodeLameduckSetEvent{ID: n.id, Time: until.UTC()})
	if ctx != nil {
		// A nexlet may hold its reply until its workloads are down, so the node does
		// not wait for it here.
		n.own("lame duck forward to the nexlets", func() { n.forwardLameduck(ctx, delay) })
	}
	if n.o.OnLameduck != nil {
		n.o.OnLameduck(delay)
	}
	return until, nil
}

// Lameduck reports whether the node is in lame duck mode and until when.
func (n *Node) Lameduck() (bool, time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return !n.lameduck.IsZero(), n.lameduck
}

func (n *Node) forwardLameduck(ctx context.Context, delay time.Duration) {
	body, _ := protocol.Marshal(protocol.LameduckRequest{Delay: delay.String()})
	count := n.agentCount()
	if count == 0 {
		return
	}
	err := gather(ctx, n.o.NC, protocol.SetLameduckAgentsSubject(n.id), body, count, n.o.FanoutTimeout, func(m *nats.Msg) bool {
		var resp protocol.LameduckResponse
		if isErrorReply(m) || protocol.Decode(m.Data, &resp) != nil {
			n.log.Warn("nexlet did not accept lameduck", "agent_id", m.Header.Get("agentId"),
				"err", m.Header.Get(protocol.HeaderError))
			resp.Success = false
		}
		n.o.Emitter.Emit(n.id, protocol.EventAgentLameduckSet, protocol.AgentLameduckSetEvent{Success: resp.Success})
		return true
	})
	if err != nil && !errors.Is(err, context.Canceled) { // canceled: the node stopped first
		n.log.Warn("forwarding lameduck to nexlets", "err", err)
	}
}
