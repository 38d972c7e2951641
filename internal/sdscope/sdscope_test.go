package sdscope

import (
	"math"
	"testing"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
)

func TestUnitName(t *testing.T) {
	for _, tc := range []struct{ id, want string }{
		{"WE5B3GXqCwUW0Ftz3jNq1d", "nex-WE5B3GXqCwUW0Ftz3jNq1d.scope"},
		{"a_b-c", "nex-a_b-c.scope"},
		{"../x", `nex-\x2e\x2e\x2fx.scope`},
		{"a.service", `nex-a\x2eservice.scope`},
		{"ä", `nex-\xc3\xa4.scope`},
		{"", "nex-.scope"},
	} {
		if got := UnitName(tc.id); got != tc.want {
			t.Errorf("UnitName(%q) = %q, want %q", tc.id, got, tc.want)
		}
	}
}

func TestSlicePath(t *testing.T) {
	for _, tc := range []struct{ slice, want string }{
		{"nex-workloads.slice", "/nex.slice/nex-workloads.slice"},
		{"a-b-c.slice", "/a.slice/a-b.slice/a-b-c.slice"},
		{"system.slice", "/system.slice"},
		{"-.slice", "/"},
	} {
		if got := SlicePath(tc.slice); got != tc.want {
			t.Errorf("SlicePath(%q) = %q, want %q", tc.slice, got, tc.want)
		}
	}
}

func props(ps []sddbus.Property) map[string]any {
	m := map[string]any{}
	for _, p := range ps {
		if _, dup := m[p.Name]; dup {
			panic("duplicate property " + p.Name)
		}
		m[p.Name] = p.Value.Value()
	}
	return m
}

// TestStartProperties pins the D-Bus names and types systemd 252 accepts for a
// transient scope; a wrong type (int64 for a "t" property) is refused by systemd with
// "Invalid argument" only at run time.
func TestStartProperties(t *testing.T) {
	m := props(StartProperties("w1", []int{42, 43}, Limits{MemoryMax: 50 << 20, CPUMax: 1.5, PidsMax: 20}))
	want := map[string]any{
		"Description":        "nex workload w1",
		"Slice":              "nex-workloads.slice",
		"PIDs":               []uint32{42, 43},
		"Delegate":           true,
		"CollectMode":        "inactive-or-failed",
		"MemoryAccounting":   true,
		"CPUAccounting":      true,
		"TasksAccounting":    true,
		"MemoryMax":          uint64(50 << 20),
		"CPUQuotaPerSecUSec": uint64(1500000),
		"TasksMax":           uint64(20),
	}
	if len(m) != len(want) {
		t.Errorf("properties %v, want %v", m, want)
	}
	for k, v := range want {
		got, ok := m[k]
		if !ok {
			t.Errorf("property %s missing", k)
			continue
		}
		if k == "PIDs" {
			g, _ := got.([]uint32)
			if len(g) != 2 || g[0] != 42 || g[1] != 43 {
				t.Errorf("PIDs = %#v", got)
			}
			continue
		}
		if got != v {
			t.Errorf("%s = %#v (%T), want %#v (%T)", k, got, got, v, v)
		}
	}
}

// TestUnsetLimitsAreInfinity: limits are always all sent, so re-applying them on
// adoption also lifts one the workload no longer has.
func TestUnsetLimitsAreInfinity(t *testing.T) {
	m := props(LimitProperties(Limits{}))
	for _, k := range []string{"MemoryMax", "CPUQuotaPerSecUSec", "TasksMax"} {
		if m[k] != uint64(math.MaxUint64) {
			t.Errorf("%s = %#v, want infinity (MaxUint64)", k, m[k])
		}
	}
	if m := props(LimitProperties(Limits{CPUMax: 0.01})); m["CPUQuotaPerSecUSec"] != uint64(10000) {
		t.Errorf("1%% CPU = %v µs/s, want 10000", m["CPUQuotaPerSecUSec"])
	}
}

func TestCgroupDir(t *testing.T) {
	d := CgroupDir("w1")
	if want := "/nex.slice/nex-workloads.slice/nex-w1.scope"; len(d) < len(want) || d[len(d)-len(want):] != want {
		t.Errorf("CgroupDir = %q, want it to end in %q", d, want)
	}
}
