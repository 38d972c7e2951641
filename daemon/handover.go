package daemon

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/protocol"
)

// envHandover names the descriptor of the memfd in which a re-executing nexd hands its
// successor image the state it needs at once (like systemd's daemon-reexec
// serialization): the nexlets it left running, so they are adopted from the memfd
// rather than found again in the state directory, and the workload users its minter
// remembers, so that a stop or a renewal after the exec still revokes the users minted
// before it. Anything missing or unreadable there is rebuilt from the state directory,
// the KV bucket and the per-workload records (the users from before the exec then
// expire with workload_creds_ttl instead of being revoked).
const envHandover = "NEXD_HANDOVER_FD"

// handoverVersion is bumped when the layout changes; another version is ignored.
const handoverVersion = 2

// handoverMax bounds what is read from the memfd (about 30 bytes of JSON per workload
// user; 100,000 workloads with a few users each fit).
const handoverMax = 64 << 20

// maxPID is the kernel's highest pid_max (PID_MAX_LIMIT on 64-bit).
const maxPID = 1 << 22

// handover is the state in the memfd.
type handover struct {
	Version int                `json:"version"`
	PID     int                `json:"pid"` // the re-executing process: the memfd is only for itself
	Nexlets []supervise.Record `json:"nexlets"`
	Users   mint.Users         `json:"users"` // the minter's workload users (mint.Remembering)
}

// writeHandover puts h in a memfd without close-on-exec and returns its descriptor
// number, for the environment of the execve.
func writeHandover(h handover) (int, error) {
	h.Version, h.PID = handoverVersion, os.Getpid()
	b, err := json.Marshal(h)
	if err != nil {
		return -1, err
	}
	fd, err := unix.MemfdCreate("nexd-handover", 0) // no MFD_CLOEXEC: it crosses the exec
	if err != nil {
		return -1, fmt.Errorf("memfd_create: %w", err)
	}
	if _, err := unix.Pwrite(fd, b, 0); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("write memfd: %w", err)
	}
	return fd, nil
}

// takeHandover reads (and closes) the memfd a re-executing predecessor left, if any,
// and unsets the variable so no child inherits it. nil with a nil error: there was
// none. An error: there was one but it cannot be used (the caller falls back).
func takeHandover(log *slog.Logger) (*handover, error) {
	v, ok := os.LookupEnv(envHandover)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(envHandover)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q is not a descriptor", envHandover, v)
	}
	f := os.NewFile(uintptr(fd), "nexd-handover")
	defer f.Close()
	h, err := readHandover(f)
	if err != nil {
		return nil, err
	}
	log.Debug("re-exec handover read", "nexlets", len(h.Nexlets), "workload_users", len(h.Users.Workloads))
	return h, nil
}

// readHandover parses a handover; it refuses another version or another process's.
func readHandover(r io.Reader) (*handover, error) {
	b, err := io.ReadAll(io.LimitReader(r, handoverMax+1))
	if err != nil {
		return nil, fmt.Errorf("read the re-exec handover: %w", err)
	}
	if len(b) > handoverMax {
		return nil, fmt.Errorf("the re-exec handover is larger than %d bytes", handoverMax)
	}
	var h handover
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("the re-exec handover is not valid JSON: %w", err)
	}
	switch {
	case h.Version != handoverVersion:
		return nil, fmt.Errorf("the re-exec handover has version %d, want %d", h.Version, handoverVersion)
	case h.PID != os.Getpid():
		return nil, fmt.Errorf("the re-exec handover was made by pid %d, not this process (%d)", h.PID, os.Getpid())
	}
	seen := make(map[string]bool, len(h.Nexlets))
	for i, r := range h.Nexlets {
		// As the adoption uses them: by name, one record a name (a second one's
		// nexlet would be neither adopted nor ended), the agent id in subjects.
		switch {
		case r.Name == "" || r.PID <= 1:
			return nil, fmt.Errorf("the re-exec handover: nexlets[%d]: no name or pid", i)
		case !protocol.IsToken(r.Name):
			return nil, fmt.Errorf("the re-exec handover: nexlets[%d]: name %q is not one a nexlet has (letters, digits, - and _)", i, r.Name)
		case seen[r.Name]:
			return nil, fmt.Errorf("the re-exec handover: nexlets[%d]: nexlet %s is named twice", i, r.Name)
		case r.PID > maxPID:
			return nil, fmt.Errorf("the re-exec handover: nexlets[%d] (%s): pid %d is above any pid (%d)", i, r.Name, r.PID, maxPID)
		case r.Meta["agent_id"] != "" && !protocol.IsToken(r.Meta["agent_id"]):
			return nil, fmt.Errorf("the re-exec handover: nexlets[%d] (%s): agent id %q is not one subject token", i, r.Name, r.Meta["agent_id"])
		}
		seen[r.Name] = true
	}
	if err := h.Users.Check(); err != nil {
		return nil, fmt.Errorf("the re-exec handover: users: %w", err)
	}
	return &h, nil
}
