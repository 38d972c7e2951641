// Package fleet runs a fleet of real nexd nodes on one Linux machine, each in its own
// network namespace with its own nats-server, and injects real faults: killed servers,
// links pulled at the switch, full disks, slow and lossy links. It needs root, iproute2
// and nsenter, and runs only when NEXD_FLEET_TEST=1 (make fleet-test); the README's
// "Running a fleet" section lists the cases and their figures.
package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
)

var bins testkit.Binaries

func TestMain(m *testing.M) { os.Exit(bins.Run(m)) }

// subnet is the fleet's private range. It exists only inside the namespaces a fleet
// creates (the bridge lives in the fleet's hub namespace), so nothing on the host or
// its networks can be reached or disturbed by the faults.
const subnet = "10.77.0"

const prefix = "nxf" // namespace, link and cgroup names start with prefix<pid>

// requireFleet skips unless the fleet tests were asked for and can run here.
func requireFleet(t *testing.T) {
	t.Helper()
	if os.Getenv("NEXD_FLEET_TEST") != "1" {
		t.Skip("fleet tests run with NEXD_FLEET_TEST=1 (make fleet-test): they need root, iproute2 and nsenter")
	}
	if os.Geteuid() != 0 {
		t.Skip("fleet tests need root (network namespaces, veth pairs, cgroups, mounts)")
	}
	for _, tool := range []string{"ip", "nsenter", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("fleet tests need %s (apt install iproute2 util-linux): %v", tool, err)
		}
	}
	sweepStale(t)
	probe := fmt.Sprintf("%s%dprobe", prefix, os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", probe).CombinedOutput(); err != nil {
		t.Skipf("fleet tests need network namespaces, and ip netns add fails here (a container without CAP_SYS_ADMIN?): %v: %s", err, out)
	}
	exec.Command("ip", "netns", "del", probe).Run()
}

// sweepStale removes namespaces and cgroups left by a fleet test process that died
// before its cleanup ran (named prefix<pid>, with that pid gone).
func sweepStale(t *testing.T) {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		if pid, ok := ownerPID(name); ok && syscall.Kill(pid, 0) == syscall.ESRCH {
			t.Logf("removing stale namespace %s", name)
			exec.Command("ip", "netns", "del", name).Run()
		}
	}
	for _, h := range []string{"memory", "cpu", "pids", "cpuacct", "cpu,cpuacct"} {
		entries, _ := os.ReadDir(filepath.Join("/sys/fs/cgroup", h))
		for _, e := range entries {
			if pid, ok := ownerPID(e.Name()); ok && syscall.Kill(pid, 0) == syscall.ESRCH {
				killTree(filepath.Join("/sys/fs/cgroup", h, e.Name()))
				removeTree(filepath.Join("/sys/fs/cgroup", h, e.Name()))
			}
		}
	}
}

func ownerPID(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, prefix)
	if !ok {
		return 0, false
	}
	digits := rest[:len(rest)-len(strings.TrimLeft(rest, "0123456789"))]
	pid, err := strconv.Atoi(digits)
	return pid, err == nil && pid > 0
}

// killTree kills every process left in the cgroup tree dir (a nexlet that outlived a
// nexd killed with its test, and its workloads): only fleet hosts' groups are passed.
func killTree(dir string) {
	for range 50 {
		var pids []int
		filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.Name() == "cgroup.procs" {
				b, _ := os.ReadFile(path)
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						pids = append(pids, pid)
					}
				}
			}
			return nil
		})
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func removeTree(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			removeTree(filepath.Join(dir, e.Name()))
		}
	}
	syscall.Rmdir(dir)
}

// Fleet is N hosts on one bridge. Host i (1-based) is namespace <id>h<i> with address
// 10.77.0.(10+i) on its eth0, whose other end <id>h<i> sits on the bridge in <id>hub.
type Fleet struct {
	t     *testing.T
	id    string // prefix<pid>x<seq>: unique per test in this process
	dir   string
	hub   string
	Hosts []*Host
	mu    sync.Mutex
	procs []*Proc
	// CtlArgs go before every nexctl command (e.g. a --gather-stall for slow links).
	CtlArgs []string
}

// Host is one machine of the fleet.
type Host struct {
	f        *Fleet
	N        int
	Name     string // h1, h2, …: also the nexd node name and the nats server name
	NS       string
	IP       string
	Dir      string
	StateDir string
	Socket   string
	Cgroup   string
	NATS     *Proc
	Nexd     *Proc
	natsConf string
	notify   *notifyLog // systemd's notify socket, played for nexd
}

var fleetSeq struct {
	sync.Mutex
	n int
}

// ip runs an iproute2 command, failing the test on error.
func (f *Fleet) ip(args ...string) {
	f.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		f.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// NewFleet builds the network of n hosts; everything it makes is removed at the end of
// the test, also when the test fails half-way.
func NewFleet(t *testing.T, n int) *Fleet {
	t.Helper()
	requireFleet(t)
	fleetSeq.Lock()
	fleetSeq.n++
	seq := fleetSeq.n
	fleetSeq.Unlock()
	f := &Fleet{t: t, id: fmt.Sprintf("%s%dx%d", prefix, os.Getpid(), seq), dir: t.TempDir()}
	f.hub = f.id + "hub"
	t.Cleanup(f.cleanup)
	f.ip("netns", "add", f.hub)
	f.ip("-n", f.hub, "link", "set", "lo", "up")
	f.ip("-n", f.hub, "link", "add", "br0", "type", "bridge")
	f.ip("-n", f.hub, "link", "set", "br0", "up")
	for i := 1; i <= n; i++ {
		h := &Host{f: f, N: i, Name: fmt.Sprintf("h%d", i), NS: fmt.Sprintf("%sh%d", f.id, i),
			IP: fmt.Sprintf("%s.%d", subnet, 10+i)}
		h.Dir = filepath.Join(f.dir, h.Name)
		h.StateDir = filepath.Join(h.Dir, "state")
		h.Socket = filepath.Join(h.Dir, "nexd.sock")
		if _, err := os.Stat("/sys/fs/cgroup/memory"); err == nil {
			h.Cgroup = filepath.Join("/sys/fs/cgroup/memory", h.NS)
		}
		for _, d := range []string{h.StateDir, filepath.Join(h.Dir, "js")} {
			if err := os.MkdirAll(d, 0o700); err != nil {
				t.Fatal(err)
			}
		}
		f.ip("netns", "add", h.NS)
		f.ip("-n", h.NS, "link", "set", "lo", "up")
		// The hub end is named after the host (unique inside the hub namespace).
		f.ip("-n", f.hub, "link", "add", h.Name, "type", "veth", "peer", "name", "eth0", "netns", h.NS)
		f.ip("-n", f.hub, "link", "set", h.Name, "master", "br0")
		f.ip("-n", f.hub, "link", "set", h.Name, "up")
		f.ip("-n", h.NS, "addr", "add", h.IP+"/24", "dev", "eth0")
		f.ip("-n", h.NS, "link", "set", "eth0", "up")
		f.Hosts = append(f.Hosts, h)
	}
	return f
}

func (f *Fleet) cleanup() {
	f.mu.Lock()
	procs := append([]*Proc(nil), f.procs...)
	f.mu.Unlock()
	// nexd first, so it stops its workloads while it still can, then the servers;
	// every nexd at once (a scale fleet has a hundred).
	var stopping sync.WaitGroup
	for _, p := range procs {
		if p.nexd {
			stopping.Go(func() { p.Stop(30 * time.Second) })
		}
	}
	stopping.Wait()
	for _, p := range procs {
		p.Stop(10 * time.Second)
	}
	for _, h := range f.Hosts {
		if h.Cgroup != "" {
			killTree(h.Cgroup) // whatever outlived its nexd (a nexd killed after its grace)
		}
		// What its nexlets left in the host's /run (read before its state dir's unmount).
		testkit.RemoveNexletDirs(filepath.Join(h.StateDir, "run", "native"))
		exec.Command("umount", "-l", h.StateDir).Run()
		exec.Command("ip", "netns", "del", h.NS).Run()
		if h.Cgroup != "" {
			for _, c := range []string{"memory", "cpu", "pids", "cpuacct", "cpu,cpuacct"} {
				removeTree(filepath.Join("/sys/fs/cgroup", c, filepath.Base(h.Cgroup)))
			}
		}
	}
	exec.Command("ip", "netns", "del", f.hub).Run()
	if f.t.Failed() {
		for _, p := range procs {
			f.t.Logf("--- %s (last 40 lines of %s)\n%s", p.name, p.log, tail(p.log, 40))
		}
	}
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Proc is a process the fleet started inside a host's namespace.
type Proc struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	nexd bool
}

// start runs bin in namespace ns (nsenter joins only its network namespace: /sys and
// the cgroup mounts stay the host's, unlike `ip netns exec`).
func (f *Fleet) start(name, ns, bin string, args ...string) *Proc {
	f.t.Helper()
	return f.startEnv(name, ns, nil, bin, args...)
}

// startEnv is start with more environment variables.
func (f *Fleet) startEnv(name, ns string, env []string, bin string, args ...string) *Proc {
	f.t.Helper()
	logPath := filepath.Join(f.dir, name+".log")
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		f.t.Fatal(err)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "--", bin}, args...)...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + f.dir}, env...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		f.t.Fatalf("start %s: %v", name, err)
	}
	p := &Proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		out.Close()
		close(p.done)
	}()
	f.mu.Lock()
	f.procs = append(f.procs, p)
	f.mu.Unlock()
	return p
}

// Stop sends SIGTERM and, after grace, SIGKILL; it returns once the process is gone.
func (p *Proc) Stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Kill is kill -9: the fault, not a shutdown.
func (p *Proc) Kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// Alive says whether the process still runs.
func (p *Proc) Alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// URL is the host's NATS client URL.
func (h *Host) URL() string { return "nats://" + h.IP + ":4222" }

// ClusterURLs is every host's client URL, h's own first.
func (h *Host) ClusterURLs() string {
	urls := []string{h.URL()}
	for _, o := range h.f.Hosts {
		if o != h {
			urls = append(urls, o.URL())
		}
	}
	return strings.Join(urls, ",")
}

// StartClusterNATS starts every host's nats-server as one JetStream cluster (topology a).
func (f *Fleet) StartClusterNATS() {
	f.t.Helper()
	for _, h := range f.Hosts {
		var routes []string
		for _, o := range f.Hosts {
			if o != h {
				routes = append(routes, fmt.Sprintf("nats-route://%s:6222", o.IP))
			}
		}
		conf := fmt.Sprintf(`server_name: %[1]s
server_tags: ["host:%[1]s"]
listen: "%[2]s:4222"
jetstream {
  store_dir: %[3]q
  max_memory_store: 64MB
  max_file_store: 512MB
}
cluster {
  name: fleet
  listen: "%[2]s:6222"
  routes: [%[4]s]
}
`, h.Name, h.IP, filepath.Join(h.Dir, "js"), strings.Join(routes, ", "))
		h.natsConf = filepath.Join(h.Dir, "nats.conf")
		testkit.WriteFile(f.t, h.natsConf, conf)
		h.StartNATS()
	}
}

// StartNATS (re)starts the host's nats-server from its config.
func (h *Host) StartNATS() {
	h.f.t.Helper()
	bin := bins.Path(h.f.t, "github.com/nats-io/nats-server/v2")
	h.NATS = h.f.start(h.Name+"-nats", h.NS, bin, "-c", h.natsConf)
}

// StartNexd starts the real nexd on the host, with its own state directory, control
// socket and cgroup root, connected to servers, and waits until it is running.
func (h *Host) StartNexd(servers string, extra ...string) {
	h.f.t.Helper()
	h.LaunchNexd(servers, extra...)
	h.WaitRunning(90 * time.Second)
}

// LaunchNexd is StartNexd without the wait.
func (h *Host) LaunchNexd(servers string, extra ...string) {
	h.f.t.Helper()
	args := []string{"--state-dir", h.StateDir, "--control-socket", h.Socket, "--node-name", h.Name,
		"--state", "kv", "--startup-timeout", "60s", "--tags", "host=" + h.Name, "--metrics-listen", metricsAddr}
	if servers != "" {
		args = append(args, "--nats.servers", servers)
	}
	if h.Cgroup != "" {
		args = append(args, "--cgroup-root", h.Cgroup)
	}
	h.listenNotify()
	h.Nexd = h.f.startEnv(h.Name+"-nexd", h.NS, []string{"NOTIFY_SOCKET=" + h.notifyPath()},
		bins.Path(h.f.t, "github.com/nexd-project/nexd/cmd/nexd"), append(args, extra...)...)
	h.Nexd.nexd = true
}

func (h *Host) notifyPath() string { return filepath.Join(h.Dir, "notify.sock") }

// listenNotify plays systemd's notify socket for the host's nexd (once per host):
// every STATUS= it sends is kept (NotifyStatuses).
func (h *Host) listenNotify() {
	h.f.t.Helper()
	if h.notify != nil {
		return
	}
	os.Remove(h.notifyPath())
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: h.notifyPath(), Net: "unixgram"})
	if err != nil {
		h.f.t.Fatalf("notify socket: %v", err)
	}
	h.notify = &notifyLog{conn: conn, done: make(chan struct{})}
	go h.notify.read()
	h.f.t.Cleanup(h.notify.close)
}

// notifyLog collects the STATUS= lines a nexd sent.
type notifyLog struct {
	conn     *net.UnixConn
	done     chan struct{}
	mu       sync.Mutex
	statuses []notifyStatus
}

type notifyStatus struct {
	at   time.Time
	text string
}

func (l *notifyLog) read() {
	defer close(l.done)
	buf := make([]byte, 64<<10)
	for {
		n, err := l.conn.Read(buf)
		if err != nil {
			return
		}
		for _, line := range strings.Split(string(buf[:n]), "\n") {
			if v, ok := strings.CutPrefix(line, "STATUS="); ok {
				l.mu.Lock()
				l.statuses = append(l.statuses, notifyStatus{time.Now(), v})
				l.mu.Unlock()
			}
		}
	}
}

func (l *notifyLog) close() {
	l.conn.Close()
	<-l.done
}

// NotifyStatusSince is the first STATUS= the host's nexd sent after t that contains
// want, with when it came ("" when none).
func (h *Host) NotifyStatusSince(t time.Time, want string) (string, time.Time) {
	if h.notify == nil {
		return "", time.Time{}
	}
	h.notify.mu.Lock()
	defer h.notify.mu.Unlock()
	for _, st := range h.notify.statuses {
		if st.at.After(t) && strings.Contains(st.text, want) {
			return st.text, st.at
		}
	}
	return "", time.Time{}
}

// NexdCheck runs nexd --check with the host's settings in its namespace and returns
// its "# state bucket" lines.
func (h *Host) NexdCheck(servers string) []string {
	h.f.t.Helper()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+h.NS, "--", bins.Path(h.f.t, "github.com/nexd-project/nexd/cmd/nexd"), "--check",
		"--state-dir", h.StateDir, "--control-socket", h.Socket, "--node-name", h.Name, "--state", "kv", "--nats.servers", servers)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + h.Dir}
	out, err := cmd.CombinedOutput()
	if err != nil {
		h.f.t.Errorf("nexd --check on %s: %v: %s", h.Name, err, out)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "# state bucket") {
			lines = append(lines, l)
		}
	}
	return lines
}

// WaitRunning waits until the node's control socket says running.
func (h *Host) WaitRunning(d time.Duration) control.Status {
	h.f.t.Helper()
	var st control.Status
	var last string
	ok := testkit.WaitFor(d, func() bool {
		if !h.Nexd.Alive() {
			return true
		}
		var err error
		st, err = h.Status()
		if err != nil {
			last = err.Error()
			return false
		}
		last = string(st.State)
		return st.State == "running"
	})
	if !ok || !h.Nexd.Alive() {
		h.f.t.Fatalf("%s: nexd not running within %v (alive %v); last: %s\n%s", h.Name, d, h.Nexd.Alive(), last, tail(h.Nexd.log, 30))
	}
	return st
}

// Status asks the node's control socket (a Unix socket: reachable whatever the network).
func (h *Host) Status() (control.Status, error) {
	c := control.NewClient(h.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Status(ctx)
}

// Workloads lists what the node runs, from its control socket.
func (h *Host) Workloads() ([]control.Workload, error) {
	c := control.NewClient(h.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.Workloads(ctx)
}

// Ctl runs nexctl inside the host's namespace against servers; it returns stdout,
// stderr and the exit code.
func (h *Host) Ctl(servers string, args ...string) (string, string, int) {
	h.f.t.Helper()
	full := append([]string{"--net=/run/netns/" + h.NS, "--", bins.Path(h.f.t, "github.com/nexd-project/nexd/cmd/nexctl"),
		"--control-socket", filepath.Join(h.Dir, "none.sock"), "--nats.servers", servers}, h.f.CtlArgs...)
	full = append(full, args...)
	cmd := exec.Command("nsenter", full...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + h.Dir}
	cmd.Dir = h.Dir
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		h.f.t.Fatalf("nexctl: %v", err)
	}
	return out.String(), errOut.String(), code
}

// Deployed is nexctl's --json answer to workload run.
type Deployed struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Node string `json:"node"`
}

// Deploy starts a long-running workload through an auction among the nodes h's NATS
// reaches (servers), as a user would with nexctl.
func (h *Host) Deploy(servers, name string, extra ...string) (Deployed, error) {
	return h.DeployCmd(servers, name, []string{"/bin/sleep", "3600"}, extra...)
}

// DeployCmd is Deploy with the workload's command.
func (h *Host) DeployCmd(servers, name string, command []string, extra ...string) (Deployed, error) {
	args := append([]string{"--json", "--nats.timeout", "5s", "workload", "run", "--name", name}, extra...)
	args = append(append(args, "--"), command...)
	out, errOut, code := h.Ctl(servers, args...)
	if code != 0 {
		return Deployed{}, fmt.Errorf("nexctl workload run %s: exit %d: %s", name, code, strings.TrimSpace(errOut))
	}
	var d Deployed
	if err := json.Unmarshal([]byte(out), &d); err != nil || d.ID == "" {
		return Deployed{}, fmt.Errorf("nexctl workload run %s: %v: %q", name, err, out)
	}
	return d, nil
}

// NodeNames are the names `nexctl node list` shows from h.
func (h *Host) NodeNames(servers string) []string {
	out, errOut, code := h.Ctl(servers, "--json", "--nats.timeout", "3s", "node", "list")
	if code != 0 {
		h.f.t.Logf("node list from %s: exit %d: %s", h.Name, code, strings.TrimSpace(errOut))
		return nil
	}
	var nodes []map[string]any
	if json.Unmarshal([]byte(out), &nodes) != nil {
		return nil
	}
	var names []string
	for _, n := range nodes {
		for _, k := range []string{"name", "node_name"} {
			if s, ok := n[k].(string); ok {
				names = append(names, s)
				break
			}
		}
		if tags, ok := n["tags"].(map[string]any); ok && len(names) < len(nodes) {
			if s, ok := tags["host"].(string); ok {
				names = append(names, s)
			}
		}
	}
	return names
}

// metricsAddr is where each nexd serves metrics, inside its own namespace.
const metricsAddr = "127.0.0.1:9464"

// Metrics are the lines of the node's /metrics that start with prefix.
func (h *Host) Metrics(prefix string) []string {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialIn(h.NS, addr, 5*time.Second) }}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return []string{err.Error()}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

// CtlLocal runs nexctl against the node's control socket (no network needed).
func (h *Host) CtlLocal(args ...string) (string, string, int) {
	h.f.t.Helper()
	cmd := exec.Command(bins.Path(h.f.t, "github.com/nexd-project/nexd/cmd/nexctl"), append([]string{"--control-socket", h.Socket}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + h.Dir}
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		h.f.t.Fatalf("nexctl: %v", err)
	}
	return out.String(), errOut.String(), code
}

// Split moves hosts onto a bridge of their own (br1 in the hub): they reach each
// other but none of the rest. Heal puts them back.
func (f *Fleet) Split(hosts []*Host) {
	f.t.Helper()
	if exec.Command("ip", "-n", f.hub, "link", "show", "br1").Run() != nil {
		f.ip("-n", f.hub, "link", "add", "br1", "type", "bridge")
		f.ip("-n", f.hub, "link", "set", "br1", "up")
	}
	for _, h := range hosts {
		f.ip("-n", f.hub, "link", "set", h.Name, "master", "br1")
	}
}

// Heal puts split hosts back on the main bridge.
func (f *Fleet) Heal(hosts []*Host) {
	f.t.Helper()
	for _, h := range hosts {
		f.ip("-n", f.hub, "link", "set", h.Name, "master", "br0")
	}
}

// LinkDown pulls the host's cable at the switch (its veth end on the hub's bridge).
func (h *Host) LinkDown() { h.f.ip("-n", h.f.hub, "link", "set", h.Name, "down") }

// LinkUp plugs it back in.
func (h *Host) LinkUp() { h.f.ip("-n", h.f.hub, "link", "set", h.Name, "up") }

// Figures collects a case's measured numbers and prints them at the end.
type Figures struct {
	t    *testing.T
	name string
	rows [][2]string
}

func NewFigures(t *testing.T, name string) *Figures {
	fg := &Figures{t: t, name: name}
	t.Cleanup(func() {
		var b strings.Builder
		fmt.Fprintf(&b, "FIGURES %s\n", name)
		for _, r := range fg.rows {
			fmt.Fprintf(&b, "  %-58s %s\n", r[0], r[1])
		}
		fmt.Print(b.String())
	})
	return fg
}

func (fg *Figures) Add(what string, v any) {
	fg.rows = append(fg.rows, [2]string{what, fmt.Sprint(v)})
}

// StateKeys are the keys of the node's KV state bucket, read with nexctl node state
// through servers (from h's namespace).
func (h *Host) StateKeys(servers, nodeID string) ([]string, error) {
	out, errOut, code := h.Ctl(servers, "--json", "--nats.timeout", "5s", "node", "state", nodeID)
	if code != 0 {
		return nil, fmt.Errorf("nexctl node state %s: exit %d: %s", nodeID, code, strings.TrimSpace(errOut))
	}
	var entries []struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil {
		return nil, fmt.Errorf("nexctl node state: %v: %q", err, out)
	}
	keys := make([]string, 0, len(entries))
	for _, e := range entries {
		keys = append(keys, e.Key)
	}
	return keys, nil
}

// LogLine returns the first line of p's log containing all of want ("" when none).
func (p *Proc) LogLine(want ...string) string {
	b, _ := os.ReadFile(p.log)
	for _, line := range strings.Split(string(b), "\n") {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			return line
		}
	}
	return ""
}

// Running maps the ids of the workloads every live node reports as running to the
// nodes that run them (a duplicate shows as two nodes).
func (f *Fleet) Running() map[string][]string {
	f.t.Helper()
	got := map[string][]string{}
	for _, h := range f.Hosts {
		if h.Nexd == nil || !h.Nexd.Alive() {
			continue
		}
		ws, err := h.Workloads()
		if err != nil {
			f.t.Fatalf("%s: workloads: %v", h.Name, err)
		}
		for _, w := range ws {
			if w.State == "running" {
				got[w.ID] = append(got[w.ID], h.Name)
			}
		}
	}
	return got
}

// WorkloadPIDs are the processes in the workload's cgroup (nil without cgroups).
func (h *Host) WorkloadPIDs(id string) []int {
	if h.Cgroup == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(h.Cgroup, "workloads", id, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// RunningInKernel maps workload ids to the hosts whose cgroups hold processes of it:
// the ground truth, independent of what any node can find out over NATS.
func (f *Fleet) RunningInKernel() map[string][]string {
	got := map[string][]string{}
	for _, h := range f.Hosts {
		if h.Cgroup == "" {
			continue
		}
		entries, _ := os.ReadDir(filepath.Join(h.Cgroup, "workloads"))
		for _, e := range entries {
			// .forkpool-N groups hold the native nexlet's waiting fork threads.
			if e.IsDir() && !strings.HasPrefix(e.Name(), ".") && len(h.WorkloadPIDs(e.Name())) > 0 {
				got[e.Name()] = append(got[e.Name()], h.Name)
			}
		}
	}
	return got
}

// SmallStateDir puts the host's state directory on a tmpfs of size (e.g. "32m"), so
// that FillStateDir can fill it; the cleanup unmounts it.
func (h *Host) SmallStateDir(size string) {
	h.f.t.Helper()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "nxf-state", h.StateDir).CombinedOutput(); err != nil {
		h.f.t.Fatalf("mount tmpfs on %s: %v: %s", h.StateDir, err, out)
	}
}

// FillStateDir writes a file into the state directory until the filesystem is full
// and returns how much it wrote.
func (h *Host) FillStateDir() int64 {
	h.f.t.Helper()
	fl, err := os.Create(filepath.Join(h.StateDir, "fill"))
	if err != nil {
		h.f.t.Fatal(err)
	}
	defer fl.Close()
	buf := make([]byte, 1<<16)
	var n int64
	for n < 1<<32 { // bounded: a tmpfs of at most 4 GiB
		w, err := fl.Write(buf)
		n += int64(w)
		if err != nil {
			break
		}
	}
	return n
}

// FreeStateDir removes the fill.
func (h *Host) FreeStateDir() { os.Remove(filepath.Join(h.StateDir, "fill")) }

// HubURL is the hub's client URL (topology b).
func (f *Fleet) HubURL() string { return "nats://" + subnet + ".1:4222" }

// Hub is the hub namespace as a host without a node: nexctl runs there (Ctl, Deploy).
func (f *Fleet) Hub() *Host {
	return &Host{f: f, Name: "hub", NS: f.hub, Dir: f.dir}
}

// StartHub gives the hub's bridge the address 10.77.0.1 and runs the central
// nats-server there (JetStream domain hub), accepting leaf nodes on :7422 with the
// user leaf / password leafpw (topology b).
func (f *Fleet) StartHub() {
	f.t.Helper()
	f.ip("-n", f.hub, "addr", "add", subnet+".1/24", "dev", "br0")
	dir := filepath.Join(f.dir, "hub")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		f.t.Fatal(err)
	}
	conf := filepath.Join(dir, "nats.conf")
	testkit.WriteFile(f.t, conf, fmt.Sprintf(`server_name: hub
listen: "%[1]s.1:4222"
jetstream { store_dir: %[2]q, domain: hub, max_memory_store: 64MB, max_file_store: 256MB }
leafnodes {
  listen: "%[1]s.1:7422"
  authorization { user: leaf, password: leafpw }
}
`, subnet, filepath.Join(dir, "js")))
	f.start("hub-nats", f.hub, bins.Path(f.t, "github.com/nats-io/nats-server/v2"), "-c", conf)
}

// HubCreds are the credentials files of a hub in operator mode: Leaf for the sites'
// leaf connections (nats.leaf_creds), Admin for nexctl at the hub; both users of the
// hub's application account, to which each site's nex account is bound.
type HubCreds struct{ Leaf, Admin string }

// StartHubOperator is StartHub with the hub in operator (JWT) mode: leaf nodes and
// clients authenticate with user credentials of its one application account (memory
// resolver, preloaded).
func (f *Fleet) StartHubOperator() HubCreds {
	f.t.Helper()
	f.ip("-n", f.hub, "addr", "add", subnet+".1/24", "dev", "br0")
	dir := filepath.Join(f.dir, "hub")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		f.t.Fatal(err)
	}
	key := func(create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string) {
		kp, err := create()
		if err != nil {
			f.t.Fatal(err)
		}
		pub, _ := kp.PublicKey()
		return kp, pub
	}
	opKP, opPub := key(nkeys.CreateOperator)
	accKP, accPub := key(nkeys.CreateAccount)
	_, sysPub := key(nkeys.CreateAccount)
	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "fleet"
	oc.SystemAccount = sysPub
	opJWT, err := oc.Encode(opKP)
	if err != nil {
		f.t.Fatal(err)
	}
	ac := jwt.NewAccountClaims(accPub)
	ac.Name = "SITES"
	accJWT, err := ac.Encode(opKP)
	if err != nil {
		f.t.Fatal(err)
	}
	sc := jwt.NewAccountClaims(sysPub)
	sc.Name = "SYS"
	sysJWT, err := sc.Encode(opKP)
	if err != nil {
		f.t.Fatal(err)
	}
	creds := func(name string) string {
		ukp, upub := key(nkeys.CreateUser)
		uc := jwt.NewUserClaims(upub)
		uc.Name = name
		tok, err := uc.Encode(accKP)
		if err != nil {
			f.t.Fatal(err)
		}
		seed, _ := ukp.Seed()
		b, err := jwt.FormatUserConfig(tok, seed)
		if err != nil {
			f.t.Fatal(err)
		}
		path := filepath.Join(dir, name+".creds")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			f.t.Fatal(err)
		}
		return path
	}
	conf := filepath.Join(dir, "nats.conf")
	testkit.WriteFile(f.t, conf, fmt.Sprintf(`server_name: hub
listen: "%[1]s.1:4222"
operator: %[2]s
system_account: %[3]s
resolver: MEMORY
resolver_preload: {
  %[3]s: %[4]s
  %[5]s: %[6]s
}
leafnodes { listen: "%[1]s.1:7422" }
`, subnet, opJWT, sysPub, sysJWT, accPub, accJWT))
	f.start("hub-nats", f.hub, bins.Path(f.t, "github.com/nats-io/nats-server/v2"), "-c", conf)
	return HubCreds{Leaf: creds("leaf"), Admin: creds("admin")}
}
