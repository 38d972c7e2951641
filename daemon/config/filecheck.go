package config

import (
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"slices"
	"strconv"
	"syscall"
)

// secretKeysIn lists the secret settings (seeds, keys, passwords) a file layer holds.
func (ld *loader) secretKeysIn(l *layer) []string {
	var out []string
	for k, v := range l.values {
		if s := ld.r.byKey[k]; s != nil && s.secret {
			if str, ok := v.(string); !ok || str != "" {
				out = append(out, k)
			}
		}
	}
	slices.Sort(out)
	return out
}

// checkSecretFile refuses a file holding secrets (what) that anyone but root or its
// owner could change, and warns when others (or a group other than nex) can read it.
// problem is an error to stop on; warning is worth saying.
func checkSecretFile(path, what string, fi fs.FileInfo) (problem, warning string) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return "", ""
	}
	mode := fi.Mode().Perm()
	owner := strconv.FormatUint(uint64(st.Uid), 10)
	if u, err := user.LookupId(owner); err == nil {
		owner = u.Username
	}
	group := strconv.FormatUint(uint64(st.Gid), 10)
	if g, err := user.LookupGroupId(group); err == nil {
		group = g.Name
	}
	desc := fmt.Sprintf("%s holds %s and has mode %04o, owner %s, group %s", path, what, mode, owner, group)
	switch {
	case mode&0o022 != 0:
		return fmt.Sprintf("%s: others can change it; fix: chmod go-w %s (0640 root:nex or 0600)", desc, path), ""
	case st.Uid != 0 && int(st.Uid) != os.Geteuid():
		return fmt.Sprintf("%s: its owner is neither root nor nexd's user; fix: chown root %s", desc, path), ""
	case mode&0o004 != 0:
		return "", fmt.Sprintf("%s: every local user can read it; fix: chmod o-r %s", desc, path)
	case mode&0o040 != 0 && group != "nex" && group != "root":
		return "", fmt.Sprintf("%s: group %s can read it; fix: chgrp nex %s or chmod g-r", desc, group, path)
	}
	return "", ""
}

// localFileUsable: ./config.json is read only when it belongs to the invoking user and
// only that user can change it (else anyone who can write the working directory could
// configure the node).
func localFileUsable(path string) (bool, string) {
	fi, err := os.Stat(path)
	if err != nil {
		return true, "" // missing or unreadable: the usual handling says so
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true, ""
	}
	if int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o022 != 0 {
		return false, fmt.Sprintf("skipped %s: owned by uid %d with mode %04o; nexd reads ./config.json only when it belongs to uid %d and is not group- or world-writable",
			path, st.Uid, fi.Mode().Perm(), os.Geteuid())
	}
	return true, ""
}
