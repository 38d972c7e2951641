// Command echo-nexlet is a minimal custom nexlet written on nexd's nexlet SDK. Its
// workloads do nothing but print a message to their log feed: a job prints it `count`
// times and ends, a service prints it every `interval` until stopped. It shows the whole
// contract a nexlet has with its node: registration with a start-request schema,
// heartbeats, start/stop/get/query, lameduck, logs and events.
//
// Locally the node spawns it and passes everything in the environment (NEX_AGENT_*).
// Remotely it is started by hand with --nexus and bootstraps itself over NATS.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/protocol"
)

const schema = `{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "EchoStartRequest",
  "type": "object",
  "required": ["message"],
  "additionalProperties": false,
  "properties": {
    "message": {"type": "string", "description": "what the workload prints"},
    "interval": {"type": "string", "description": "Go duration between prints (default 1s)"},
    "count": {"type": "integer", "minimum": 1, "description": "prints of a job (default 1)"}
  }
}`

type echoRequest struct {
	Message  string `json:"message"`
	Interval string `json:"interval"`
	Count    int    `json:"count"`
}

type echoWorkload struct {
	req     protocol.StartWorkloadRequest
	started time.Time
	stop    context.CancelFunc
	done    chan struct{}
}

// echoAgent implements nexlet.Agent.
type echoAgent struct {
	name     string // registered name; two echo nexlets on one node need two
	started  time.Time
	log      *slog.Logger
	runner   *nexlet.Runner
	mu       sync.Mutex
	wls      map[string]*echoWorkload
	lameduck bool
}

func (a *echoAgent) Register() (*protocol.RegisterAgentRequest, error) {
	return &protocol.RegisterAgentRequest{Name: a.name, RegisterType: "echo", Version: "0.1.0",
		Description: "Prints a message to the workload log feed", PublicXKey: "", StartRequestSchema: schema,
		SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleJob, protocol.LifecycleService}}, nil
}

func (a *echoAgent) Ping() (*protocol.AgentSummary, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	state := "running"
	if a.lameduck {
		state = "lameduck"
	}
	return &protocol.AgentSummary{Name: a.name, Type: "echo", StartTime: a.started, State: state,
		SupportedLifecycles: "job,service", Version: "0.1.0", WorkloadCount: len(a.wls)}, nil
}

func (a *echoAgent) Heartbeat() (*protocol.AgentHeartbeat, error) {
	s, err := a.Ping()
	if err != nil {
		return nil, err
	}
	return &protocol.AgentHeartbeat{Data: "{}", Summary: *s}, nil
}

func (a *echoAgent) StartWorkload(id string, req *protocol.AgentStartWorkloadRequest, existing bool) (*protocol.StartWorkloadResponse, error) {
	var er echoRequest
	if err := json.Unmarshal([]byte(req.Request.RunRequest), &er); err != nil {
		return nil, fmt.Errorf("run_request: %w", err)
	}
	if er.Message == "" {
		return nil, errors.New("run_request: message is required")
	}
	every := time.Second
	if er.Interval != "" {
		d, err := time.ParseDuration(er.Interval)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("run_request: interval %q: want a positive Go duration", er.Interval)
		}
		every = d
	}
	count := max(er.Count, 1)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.lameduck {
		return nil, errors.New("echo nexlet is in lameduck mode")
	}
	if _, ok := a.wls[id]; ok {
		if existing {
			return &protocol.StartWorkloadResponse{ID: id, Name: req.Request.Name}, nil
		}
		return nil, fmt.Errorf("workload %s is already running", id)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &echoWorkload{req: req.Request, started: time.Now().UTC(), stop: cancel, done: make(chan struct{})}
	a.wls[id] = w
	ns := req.Request.Namespace
	out := a.runner.Logger(id, ns, "stdout")
	go func() {
		defer close(w.done)
		t := time.NewTicker(every)
		defer t.Stop()
		job := req.Request.WorkloadLifecycle == protocol.LifecycleJob
		for i := 0; ; i++ {
			_, _ = out.Write([]byte(er.Message))
			if job && i+1 >= count {
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		// A job that ran to completion ends by itself.
		a.mu.Lock()
		delete(a.wls, id)
		a.mu.Unlock()
		_ = a.runner.EmitEvent(ns, protocol.EventWorkloadStopped, protocol.WorkloadStoppedEvent{ID: id, Namespace: ns, WorkloadType: "echo"})
	}()
	_ = a.runner.EmitEvent(ns, protocol.EventWorkloadStarted, protocol.WorkloadStartedEvent{ID: id, Namespace: ns, WorkloadType: "echo"})
	a.log.Info("echo workload started", "workload_id", id, "existing", existing)
	return &protocol.StartWorkloadResponse{ID: id, Name: req.Request.Name}, nil
}

func (a *echoAgent) StopWorkload(id string, req *protocol.StopWorkloadRequest) error {
	a.mu.Lock()
	w, ok := a.wls[id]
	if !ok || (req.Namespace != protocol.SystemNamespace && req.Namespace != w.req.Namespace) {
		a.mu.Unlock()
		return errors.New(protocol.ErrTextWorkloadNotFound)
	}
	delete(a.wls, id)
	a.mu.Unlock()
	w.stop()
	<-w.done
	return a.runner.EmitEvent(w.req.Namespace, protocol.EventWorkloadStopped,
		protocol.WorkloadStoppedEvent{ID: id, Namespace: w.req.Namespace, WorkloadType: "echo"})
}

func (a *echoAgent) GetWorkload(id, _ string) (*protocol.StartWorkloadRequest, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	w, ok := a.wls[id]
	if !ok {
		return nil, errors.New(protocol.ErrTextWorkloadNotFound)
	}
	r := w.req
	return &r, nil
}

func (a *echoAgent) QueryWorkloads(ns string, filter []string) ([]protocol.WorkloadSummary, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := []protocol.WorkloadSummary{}
	for id, w := range a.wls {
		if ns != protocol.SystemNamespace && ns != w.req.Namespace {
			continue
		}
		if len(filter) > 0 && !slices.Contains(filter, id) && !slices.Contains(filter, w.req.Name) {
			continue
		}
		wns := w.req.Namespace
		out = append(out, protocol.WorkloadSummary{ID: id, Name: w.req.Name, Namespace: &wns,
			Runtime: time.Since(w.started).Round(time.Second).String(), StartTime: w.started.Format(time.RFC3339),
			Tags: w.req.Tags, WorkloadLifecycle: string(w.req.WorkloadLifecycle), WorkloadState: protocol.WorkloadRunning,
			WorkloadType: "echo"})
	}
	return out, nil
}

func (a *echoAgent) SetLameduck(before time.Duration) error {
	a.mu.Lock()
	a.lameduck = true
	a.mu.Unlock()
	time.AfterFunc(before, func() {
		a.mu.Lock()
		ids := make([]string, 0, len(a.wls))
		for id := range a.wls {
			ids = append(ids, id)
		}
		a.mu.Unlock()
		for _, id := range ids {
			_ = a.StopWorkload(id, &protocol.StopWorkloadRequest{Namespace: protocol.SystemNamespace})
		}
	})
	return nil
}

// identity finds the node, agent id and registration credentials: from the node's
// environment when spawned locally, or by remote registration with --nexus.
func identity(ctx context.Context, nexus, natsURL, credsFile string) (string, string, protocol.NatsConnectionData, error) {
	var none protocol.NatsConnectionData
	if nexus == "" {
		cd, err := nexlet.ConnDataFromEnv(os.Getenv)
		if err != nil {
			return "", "", none, fmt.Errorf("%w (or use --nexus to register remotely)", err)
		}
		node, agent, err := nexlet.IdentityFromEnv(os.Getenv)
		return node, agent, cd, err
	}
	var opts []nats.Option
	if credsFile != "" {
		opts = append(opts, nats.UserCredentials(credsFile))
	}
	nc, err := nats.Connect(natsURL, opts...)
	if err != nil {
		return "", "", none, fmt.Errorf("connect to %s: %w", natsURL, err)
	}
	defer nc.Close()
	resp, err := nexlet.RemoteInit(ctx, nc, nexus)
	if err != nil {
		return "", "", none, err
	}
	cd := protocol.NatsConnectionData{}
	if resp.RegistrationCreds != nil {
		cd = *resp.RegistrationCreds
	}
	if len(cd.NatsServers) == 0 {
		cd.NatsServers = strings.Split(natsURL, ",")
	}
	if cd.NatsUserJWT == "" && cd.NatsUserSeed == "" && cd.NatsUserName == "" {
		// The node handed out no credentials of its own (a development minter): keep ours.
		cd = protocol.NatsConnectionData{NatsServers: cd.NatsServers}
	}
	return resp.RespondTo, resp.AssignedAgentID, cd, nil
}

func run(ctx context.Context, log *slog.Logger, name, nexus, natsURL, credsFile string) error {
	node, agentID, cd, err := identity(ctx, nexus, natsURL, credsFile)
	if err != nil {
		return err
	}
	// A supervising node hands a per-start key; a remote nexlet sets the same variable
	// to the seed of the key listed for it in the node's remote_nexlets.
	regKey, err := nexlet.RegistrationKeyFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	a := &echoAgent{name: name, started: time.Now().UTC(), log: log, wls: map[string]*echoWorkload{}}
	r, err := nexlet.NewRunner(ctx, node, a, nexlet.WithLogger(log), nexlet.WithRegistrationKey(regKey))
	if err != nil {
		return err
	}
	a.runner = r
	if err := r.Run(agentID, cd); err != nil {
		return err
	}
	log.Info("echo nexlet registered", "node", node, "agent_id", agentID)
	<-ctx.Done()
	return r.Shutdown()
}

func main() {
	name := flag.String("name", "echo", "name to register under (each nexlet on a node needs its own)")
	nexus := flag.String("nexus", "", "register remotely with this nexus (the node needs --allow-remote-agent-registration)")
	natsURL := flag.String("nats", nats.DefaultURL, "NATS servers for remote registration")
	creds := flag.String("creds", "", "NATS credentials file for remote registration")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, log, *name, *nexus, *natsURL, *creds); err != nil {
		log.Error("echo nexlet failed", "err", err)
		os.Exit(1)
	}
}
