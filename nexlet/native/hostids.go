package native

import (
	"bufio"
	"bytes"
	"os"
	"os/user"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// hostIDs answers whether a uid (or the same gid) belongs to a user or group of the
// host, or to a dynamic user systemd handed out: a dynamic uid must be neither. It is
// asked on every deploy (a pooled uid is checked again when it is taken) and for each
// uid a refill leases, so it keeps the ids of /etc/passwd and /etc/group and reads the
// files again only when one of them changed (its inode, size, modification or change
// time): a deploy then costs two stat calls, not a parse of both files (os/user's
// lookups, 0.15 ms per uid in the static build on this 2-core machine at load 16). It
// reads the files as Go's own os/user does without cgo, which is how nexd is built; a
// build with cgo asks the system's user database (NSS) as well (nssLookups).
type hostIDs struct {
	passwd, group string // the files (a test points them elsewhere)
	// sdDir is systemd's dynamic uid lock directory, whose files name the uids systemd
	// holds; "" when the nexlet takes systemd's locks itself (sdLocks), which tells
	// exactly which uids another process holds.
	sdDir string

	mu    sync.Mutex
	stamp [2]fileStamp // of passwd and group when ids was read
	ids   map[uint32]bool
}

func newHostIDs() *hostIDs {
	return &hostIDs{passwd: "/etc/passwd", group: "/etc/group", sdDir: DefaultSystemdUIDDir}
}

// fileStamp tells whether a file changed: a rewrite (useradd writes a new file and
// renames it) changes its inode, an edit in place its size or times.
type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
	missing      bool
}

func stampOf(path string) fileStamp {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileStamp{missing: true}
	}
	return fileStamp{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// uses reports whether uid is a host user's or group's id, or a dynamic user's of
// systemd.
func (h *hostIDs) uses(uid uint32) bool {
	if h.listed(uid) {
		return true
	}
	s := strconv.FormatUint(uint64(uid), 10)
	if nssLookups {
		if _, err := user.LookupId(s); err == nil {
			return true
		}
		if _, err := user.LookupGroupId(s); err == nil {
			return true
		}
	}
	if h.sdDir == "" {
		return false
	}
	var st unix.Stat_t
	return unix.Lstat(h.sdDir+"/"+s, &st) == nil
}

// listed reports whether /etc/passwd names uid as a user's uid or /etc/group as a
// group's gid. The files are stamped before they are read, so a change while they are
// read is seen at the next call.
func (h *hostIDs) listed(uid uint32) bool {
	now := [2]fileStamp{stampOf(h.passwd), stampOf(h.group)}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ids == nil || now != h.stamp {
		ids := map[uint32]bool{}
		readIDs(h.passwd, 6, ids)
		readIDs(h.group, 3, ids)
		h.ids, h.stamp = ids, now
	}
	return h.ids[uid]
}

// readIDs adds the ids (third field) of a colon file's entries to ids, with os/user's
// rules (lookup_unix.go): a line is trimmed, blank lines and comments are skipped, an
// entry needs a name that starts with neither '+' nor '-' and at least cols colons, a
// user also a numeric gid; the id must be written as os/user would look it up (no sign,
// no leading zero). An unreadable file adds nothing, as it lets os/user find nothing.
func readIDs(path string, cols int, ids map[uint32]bool) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	rd := bufio.NewReader(f)
	for {
		line, err := rd.ReadBytes('\n')
		if len(line) == 0 && err != nil {
			return
		}
		line = bytes.TrimSpace(line)
		if len(line) == 0 || line[0] == '#' || line[0] == '+' || line[0] == '-' || line[0] == ':' ||
			bytes.Count(line, []byte{':'}) < cols {
			continue
		}
		parts := bytes.SplitN(line, []byte{':'}, 5)
		if cols == 6 {
			if _, err := strconv.Atoi(string(parts[3])); err != nil {
				continue
			}
		}
		id, err := strconv.ParseUint(string(parts[2]), 10, 32)
		if err != nil || strconv.FormatUint(id, 10) != string(parts[2]) {
			continue
		}
		ids[uint32(id)] = true
	}
}
