package main

import (
	"bytes"
	"debug/buildinfo"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

var bins testkit.Binaries

func TestMain(m *testing.M) { os.Exit(bins.Run(m)) }

// Package initialisation runs in nexd and again in its native nexlet (the same binary),
// whatever either process goes on to use; what it allocates and keeps is memory both
// pay at idle, and its garbage is start-up time. About 460 KB today, mostly nats-server's
// and nats.go's; 2.3 MB when jsonschema compiled five drafts' meta-schemas in init and
// nexd's own packages compiled their regexps there.
const (
	maxInitBytes = 768 << 10 // the whole binary
	maxOwnBytes  = 16 << 10  // this module's packages together
)

// TestInitAllocations reads the runtime's own account of each package's init
// (GODEBUG=inittrace=1, printed before main runs) and bounds what the binary and
// nexd's own packages allocate there.
func TestInitAllocations(t *testing.T) {
	inits := initTrace(t)
	var total, own int64
	for _, in := range inits {
		total += in.bytes
		if strings.HasPrefix(in.pkg, "github.com/nexd-project/nexd/") {
			own += in.bytes
		}
	}
	slices.SortFunc(inits, func(a, b initCost) int { return int(b.bytes - a.bytes) })
	top := inits[:min(8, len(inits))]
	t.Logf("init allocates %d bytes in %d packages (nexd's own %d); largest: %v", total, len(inits), own, top)
	if total > maxInitBytes {
		t.Errorf("package init allocates %d bytes, more than %d: both nexd and the native nexlet pay it; largest: %v", total, maxInitBytes, top)
	}
	if own > maxOwnBytes {
		var mine []initCost
		for _, in := range inits {
			if strings.HasPrefix(in.pkg, "github.com/nexd-project/nexd/") && in.bytes > 0 {
				mine = append(mine, in)
			}
		}
		t.Errorf("nexd's own packages allocate %d bytes in init, more than %d (make package-level state constant, or build it where it is used): %v", own, maxOwnBytes, mine)
	}
}

// Modules kept out of the binary for memory: every linked package's init runs in nexd
// and again in the native nexlet, and each maps its 64 KB blocks of text, tables and
// pclntab in both processes (docs/performance-notes.md, Memory).
var unwantedModules = map[string]string{
	"golang.org/x/text":                   "jsonschema's localized messages (third_party/jsonschema prints with fmt): 0.7 MB of idle RSS",
	"github.com/prometheus/client_golang": "daemon/metrics writes the text format itself",
}

// TestNoUnwantedModules reads nexd's build information for modules that were dropped
// because linking them cost memory in both processes.
func TestNoUnwantedModules(t *testing.T) {
	nexd := bins.Path(t, "github.com/nexd-project/nexd/cmd/nexd")
	info, err := buildinfo.ReadFile(nexd)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range info.Deps {
		if why, ok := unwantedModules[m.Path]; ok {
			t.Errorf("nexd links %s %s again; it was dropped for memory: %s", m.Path, m.Version, why)
		}
	}
}

// nexdOnlyWithoutInit are packages only nexd runs (of daemon, the nexlet runs Main alone)
// whose part of the binary the native nexlet (the same binary) mapped for their init
// alone: a 64 KB block of text each (docs/performance-notes.md, Memory). Without an init, the nexlet leaves
// them unmapped (about 0.4 MB of its RSS).
var nexdOnlyWithoutInit = []string{
	"github.com/nexd-project/nexd/control",
	"github.com/nexd-project/nexd/daemon",
	"github.com/nexd-project/nexd/daemon/logging",
	"github.com/nexd-project/nexd/daemon/metrics",
	"github.com/nexd-project/nexd/daemon/node",
	"github.com/nexd-project/nexd/daemon/supervise",
}

// TestNexdOnlyPackagesHaveNoInit reads the runtime's list of the packages whose init runs
// (GODEBUG=inittrace=1) for the packages above: package-level maps and calls
// (fmt.Errorf, sync.OnceValue, strings.NewReplacer, regexp.MustCompile) make one;
// constants, static composite literals and errors.New (initialised statically by the
// compiler) do not.
func TestNexdOnlyPackagesHaveNoInit(t *testing.T) {
	inits := initTrace(t)
	for _, in := range inits {
		if slices.Contains(nexdOnlyWithoutInit, in.pkg) {
			t.Errorf("package %s has an init again (it allocates %d bytes): the native nexlet runs it too and maps that part of the binary for it; make its package-level state constant or build it where it is used", in.pkg, in.bytes)
		}
	}
}

// initTrace runs nexd --version under GODEBUG=inittrace=1, the runtime's own account of
// each package's init (printed before main runs).
func initTrace(t *testing.T) []initCost {
	t.Helper()
	nexd := bins.Path(t, "github.com/nexd-project/nexd/cmd/nexd")
	cmd := exec.Command(nexd, "--version")
	cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("nexd --version: %v\n%s", err, stderr.String())
	}
	inits, err := parseInitTrace(stderr.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(inits) < 50 {
		t.Fatalf("inittrace listed only %d packages:\n%s", len(inits), stderr.String())
	}
	return inits
}

type initCost struct {
	pkg   string
	bytes int64
}

func (c initCost) String() string { return fmt.Sprintf("%s %d", c.pkg, c.bytes) }

// parseInitTrace reads lines like
//
//	init github.com/x/y @1.2 ms, 0.05 ms clock, 4096 bytes, 12 allocs
func parseInitTrace(s string) ([]initCost, error) {
	var out []initCost
	for line := range strings.Lines(s) {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "init" {
			continue
		}
		i := slices.Index(f, "bytes,")
		if i < 1 {
			return nil, fmt.Errorf("inittrace line without a byte count: %q", line)
		}
		n, err := strconv.ParseInt(f[i-1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("inittrace line %q: %w", line, err)
		}
		out = append(out, initCost{pkg: f[1], bytes: n})
	}
	return out, nil
}
