// Package sdscope runs workloads in transient systemd scopes (cgroup_driver: systemd):
// one scope nex-<id>.scope per workload in nex-workloads.slice, created over D-Bus with
// the workload's limits as unit properties. systemd owns these cgroups: limits are only
// ever set through it (a value written behind its back is lost at the next
// daemon-reload), and the cgroup files are only read here.
package sdscope

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// Slice is where every workload scope lives: nex.slice/nex-workloads.slice, so
// `systemctl status nex-workloads.slice` and systemd-cgtop show all workloads of the host
// together, outside nexd.service.
const Slice = "nex-workloads.slice"

// StartTimeout bounds the wait for systemd to run a scope's start job (runc waits 30 s;
// a shorter wait that then carried on gave "unit not found" errors, runc#1683).
const StartTimeout = 30 * time.Second

// Limits of one workload's scope. Zero fields are unset (infinity).
type Limits struct {
	MemoryMax int64   // bytes: MemoryMax=
	CPUMax    float64 // CPUs: CPUQuota= (1.5 = 150%)
	PidsMax   int64   // TasksMax=
}

// UnitName is the scope of workload id: nex-<id>.scope, with any byte outside
// [A-Za-z0-9_-] escaped as \xNN as systemd-escape does (workload ids never need it; the
// escape keeps any other id from naming another unit type or path).
func UnitName(id string) string { return "nex-" + Escape(id) + ".scope" }

// Escape escapes s for use inside a unit name.
func Escape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, `\x%02x`, c)
	}
	return b.String()
}

// SlicePath is the cgroup path of a slice as systemd lays it out: every dash opens a
// level, so nex-workloads.slice is /nex.slice/nex-workloads.slice.
func SlicePath(slice string) string {
	name := strings.TrimSuffix(slice, ".slice")
	if name == "" || name == "-" {
		return "/"
	}
	var p, prefix string
	for part := range strings.SplitSeq(name, "-") {
		if prefix != "" {
			prefix += "-"
		}
		prefix += part
		p += "/" + prefix + ".slice"
	}
	return p
}

// infinity is systemd's "no limit" for the uint64 properties below.
const infinity = math.MaxUint64

// LimitProperties are the unit properties for l: every limit is sent, an unset one as
// infinity, so setting them again on a live scope also lifts limits that were removed.
func LimitProperties(l Limits) []sddbus.Property {
	u := func(n int64) uint64 {
		if n <= 0 {
			return infinity
		}
		return uint64(n)
	}
	cpu := uint64(infinity)
	if l.CPUMax > 0 {
		// CPUQuotaPerSecUSec is the D-Bus name of CPUQuota= (µs of CPU time per second).
		cpu = uint64(l.CPUMax*1e6 + 0.5)
	}
	return []sddbus.Property{
		prop("MemoryMax", u(l.MemoryMax)),
		prop("CPUQuotaPerSecUSec", cpu),
		prop("TasksMax", u(l.PidsMax)),
	}
}

// StartProperties are the properties of a new workload scope holding pids.
func StartProperties(id string, pids []int, l Limits) []sddbus.Property {
	ps := make([]uint32, 0, len(pids))
	for _, p := range pids {
		ps = append(ps, uint32(p))
	}
	props := []sddbus.Property{
		sddbus.PropDescription("nex workload " + id),
		sddbus.PropSlice(Slice),
		sddbus.PropPids(ps...),
		// Delegate lets AttachProcessesToUnit move the processes a workload forked
		// before the scope existed (systemd refuses it on undelegated units).
		prop("Delegate", true),
		// A scope that failed (an OOM kill, a kill by signal) must not linger and
		// block the name for the next start of the same workload (runc#3780).
		prop("CollectMode", "inactive-or-failed"),
		prop("MemoryAccounting", true),
		prop("CPUAccounting", true),
		prop("TasksAccounting", true),
	}
	return append(props, LimitProperties(l)...)
}

func prop(name string, v any) sddbus.Property {
	return sddbus.Property{Name: name, Value: dbus.MakeVariant(v)}
}

// Available says why systemd cannot be used as the cgroup driver here, nil when it can:
// systemd must be the init system (sd_booted: /run/systemd/system exists).
func Available() error {
	if fi, err := os.Stat("/run/systemd/system"); err != nil || !fi.IsDir() {
		return errors.New("systemd is not the init system here (no /run/systemd/system)")
	}
	return nil
}

// CheckDriver says why the cgroup driver named cannot be used on this host: "systemd"
// needs systemd as the init system and root (starting transient units over D-Bus).
func CheckDriver(driver string) error {
	if driver != "systemd" {
		return nil
	}
	if err := Available(); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("nexd must run as root to start transient scopes")
	}
	return nil
}

// CgroupDir is the directory of workload id's scope in the hierarchy where systemd
// tracks processes: the unified (cgroup2) one, at /sys/fs/cgroup or, on a hybrid host,
// /sys/fs/cgroup/unified; else the name=systemd hierarchy.
func CgroupDir(id string) string {
	return filepath.Join(trackingMount(), SlicePath(Slice), UnitName(id))
}

// SliceDir is the workloads slice's directory (see CgroupDir).
func SliceDir() string { return filepath.Join(trackingMount(), SlicePath(Slice)) }

func trackingMount() string {
	for _, p := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return p
		}
	}
	return "/sys/fs/cgroup/systemd"
}

// Client talks to systemd's manager. It reconnects when systemd dropped the
// connection (a daemon-reexec closes its private socket). Safe for concurrent use.
type Client struct {
	mu   sync.Mutex
	conn *sddbus.Conn
}

// Dial connects to systemd: as root straight to its private socket (what systemctl
// does; no dbus-daemon in between), else over the system bus.
func Dial(ctx context.Context) (*Client, error) {
	c := &Client{}
	if _, err := c.bus(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Client) bus(ctx context.Context) (*sddbus.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil && c.conn.Connected() {
		return c.conn, nil
	}
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
	var conn *sddbus.Conn
	var err error
	if os.Geteuid() == 0 {
		conn, err = sddbus.NewSystemdConnectionContext(ctx)
	}
	if conn == nil {
		var err2 error
		if conn, err2 = sddbus.NewSystemConnectionContext(ctx); err2 != nil {
			return nil, fmt.Errorf("connect to systemd: %w", errors.Join(err, err2))
		}
	}
	c.conn = conn
	return conn, nil
}

// Close ends the connection.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// Error names systemd answers with.
const (
	errUnitExists = "org.freedesktop.systemd1.UnitExists"
	errNoSuchUnit = "org.freedesktop.systemd1.NoSuchUnit"
	errNotLoaded  = "org.freedesktop.systemd1.LoadFailed"
)

func dbusErrorIs(err error, name string) bool {
	var de dbus.Error
	if errors.As(err, &de) {
		return de.Name == name
	}
	var dp *dbus.Error
	return errors.As(err, &dp) && dp.Name == name
}

// Start creates workload id's scope with pids in it and l as its limits, and waits for
// systemd's start job. A failed unit of the same name left from an earlier run is
// reset first; one still being torn down is waited for briefly.
func (c *Client) Start(ctx context.Context, id string, pids []int, l Limits) error {
	name := UnitName(id)
	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	props := StartProperties(id, pids, l)
	for attempt := 0; ; attempt++ {
		conn, err := c.bus(ctx)
		if err != nil {
			return err
		}
		ch := make(chan string, 1)
		_, err = conn.StartTransientUnitContext(ctx, name, "fail", props, ch)
		if err != nil {
			if dbusErrorIs(err, errUnitExists) && attempt < 5 {
				_ = conn.ResetFailedUnitContext(ctx, name)
				select {
				case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
				case <-ctx.Done():
					return fmt.Errorf("start %s: %w", name, ctx.Err())
				}
				continue
			}
			return fmt.Errorf("start %s: %w", name, err)
		}
		select {
		case res := <-ch:
			if res == "done" {
				return nil
			}
			_ = conn.ResetFailedUnitContext(context.WithoutCancel(ctx), name)
			return fmt.Errorf("start %s: systemd's job ended %q", name, res)
		case <-ctx.Done():
			_ = conn.ResetFailedUnitContext(context.WithoutCancel(ctx), name)
			return fmt.Errorf("start %s: no job result within %s: %w", name, StartTimeout, ctx.Err())
		}
	}
}

// SetLimits sets l on workload id's live scope (runtime only: the scope ends with the
// workload anyway).
func (c *Client) SetLimits(ctx context.Context, id string, l Limits) error {
	conn, err := c.bus(ctx)
	if err != nil {
		return err
	}
	if err := conn.SetUnitPropertiesContext(ctx, UnitName(id), true, LimitProperties(l)...); err != nil {
		return fmt.Errorf("set limits of %s: %w", UnitName(id), err)
	}
	return nil
}

// Attach moves pids into workload id's scope.
func (c *Client) Attach(ctx context.Context, id string, pids []int) error {
	conn, err := c.bus(ctx)
	if err != nil {
		return err
	}
	ps := make([]uint32, 0, len(pids))
	for _, p := range pids {
		ps = append(ps, uint32(p))
	}
	if err := conn.AttachProcessesToUnit(ctx, UnitName(id), "/", ps); err != nil {
		return fmt.Errorf("attach %v to %s: %w", pids, UnitName(id), err)
	}
	return nil
}

// Kill sends sig to every process of workload id's scope. A scope that is gone (or was
// never made) is not an error.
func (c *Client) Kill(ctx context.Context, id string, sig syscall.Signal) error {
	conn, err := c.bus(ctx)
	if err != nil {
		return err
	}
	err = conn.KillUnitWithTarget(ctx, UnitName(id), sddbus.All, int32(sig))
	if err != nil && !dbusErrorIs(err, errNoSuchUnit) && !dbusErrorIs(err, errNotLoaded) {
		return fmt.Errorf("kill %s: %w", UnitName(id), err)
	}
	return nil
}

// ResetFailed forgets workload id's scope if it failed (an OOM kill or a signal ended
// it), so that nothing lingers; a missing or inactive unit is not an error.
func (c *Client) ResetFailed(ctx context.Context, id string) {
	if conn, err := c.bus(ctx); err == nil {
		_ = conn.ResetFailedUnitContext(ctx, UnitName(id))
	}
}
