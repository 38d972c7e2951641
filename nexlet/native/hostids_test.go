package native

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestHostIDsFollowTheirFiles: the ids are read as os/user reads them (comments, '+'
// and '-' entries, short lines, a non-numeric gid and a non-canonical id are not ids),
// and read again after any change to either file: an append in place, a replacement
// by rename (as useradd writes), a removal.
func TestHostIDsFollowTheirFiles(t *testing.T) {
	dir := t.TempDir()
	h := &hostIDs{passwd: filepath.Join(dir, "passwd"), group: filepath.Join(dir, "group")}
	write := func(path, text string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(h.passwd, "root:x:0:0:root:/root:/bin/sh\n# c:x:7:7:::\n+nis:x:8:8:::\n-x:x:9:9:::\nshort:x:10:10:\n"+
		"badgid:x:11:z:::\nlead:x:012:12:::\n  sp:x:13:13:::  \n:x:14:14:::\nbig:x:4294967296:0:::\nlast:x:15:15:::")
	write(h.group, "wheel:x:20:\n+g:x:21:\nfew:22\n")
	check := func(when string, want map[uint32]bool) {
		t.Helper()
		for id, w := range want {
			if got := h.listed(id); got != w {
				t.Errorf("%s: listed(%d) = %v, want %v", when, id, got, w)
			}
		}
	}
	check("first read", map[uint32]bool{0: true, 13: true, 15: true, 20: true,
		7: false, 8: false, 9: false, 10: false, 11: false, 12: false, 14: false, 21: false, 22: false, 30: false})

	f, err := os.OpenFile(h.passwd, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("\nnew:x:30:30:::\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	check("after an append", map[uint32]bool{30: true, 0: true})

	write(h.group+".new", "g2:x:31:\n")
	if err := os.Rename(h.group+".new", h.group); err != nil {
		t.Fatal(err)
	}
	check("after a rename over group", map[uint32]bool{31: true, 20: false, 30: true})

	if err := os.Remove(h.passwd); err != nil {
		t.Fatal(err)
	}
	check("after passwd's removal", map[uint32]bool{0: false, 30: false, 31: true})
}

// TestHostIDsAgreeWithOSUser: for every id the host's files mention, hostIDs and
// os/user (what the check asked before) agree; with cgo, os/user may know more (NSS),
// never less.
func TestHostIDsAgreeWithOSUser(t *testing.T) {
	h := newHostIDs()
	seen := 0
	for _, path := range []string{h.passwd, h.group} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Skipf("%s: %v", path, err)
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			parts := bytes.Split(sc.Bytes(), []byte{':'})
			if len(parts) < 3 {
				continue
			}
			id, err := strconv.ParseUint(string(parts[2]), 10, 32)
			if err != nil {
				continue
			}
			s := strconv.FormatUint(id, 10)
			_, uerr := user.LookupId(s)
			_, gerr := user.LookupGroupId(s)
			found := uerr == nil || gerr == nil
			got := h.listed(uint32(id))
			if got && !found || !got && found && !nssLookups {
				t.Errorf("id %d: listed %v, os/user found %v", id, got, found)
			}
			seen++
		}
	}
	if seen == 0 {
		t.Skip("no ids in the host's files")
	}
}

// BenchmarkHostUses is the check a deploy makes of the uid it takes from the pool (and
// a refill of each uid it leases): os/user's lookups, as before, against hostIDs with
// unchanged files. Run it with CGO_ENABLED=0, as nexd is built.
func BenchmarkHostUses(b *testing.B) {
	const uid = 2000123
	b.Run("os-user", func(b *testing.B) {
		b.ReportAllocs()
		s := strconv.FormatUint(uid, 10)
		for b.Loop() {
			_, _ = user.LookupId(s)
			_, _ = user.LookupGroupId(s)
			_, _ = os.Lstat("/run/systemd/dynamic-uid/" + s)
		}
	})
	b.Run("hostids", func(b *testing.B) {
		b.ReportAllocs()
		h := newHostIDs()
		for b.Loop() {
			h.uses(uid)
		}
	})
}

// TestPooledUIDThatBecameAHostUserIsNotTaken: a uid leased ahead for the pool that a
// host user or group took meanwhile (here: /etc/group gained it after the pool's
// check) is refused when a deploy takes it, and its lease removed.
func TestPooledUIDThatBecameAHostUserIsNotTaken(t *testing.T) {
	needRoot(t)
	uid := testkit.UIDs(t, 1)
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid})
	dir := t.TempDir()
	us.hosts = &hostIDs{passwd: filepath.Join(dir, "passwd"), group: filepath.Join(dir, "group")}
	if err := os.WriteFile(us.hosts.group, []byte("wheel:x:0:\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	owner := "/proc/" + strconv.Itoa(os.Getpid())
	ids, err := us.leaseFreshN(owner, 1)
	if err != nil || len(ids) != 1 || ids[0].uid != uid {
		t.Fatalf("leased %v: %v", ids, err)
	}
	if err := os.WriteFile(us.hosts.group, []byte(fmt.Sprintf("wheel:x:0:\nlate:x:%d:\n", uid)), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &uidPool{u: us, owner: owner}
	made, ok, err := p.claim(pooledUID{id: ids[0]}, filepath.Join(t.TempDir(), "w"))
	if ok || made || err != nil {
		t.Fatalf("claim of a uid that became a host group: made=%v ok=%v err=%v", made, ok, err)
	}
	if _, err := os.Stat(us.leasePath(uid)); !os.IsNotExist(err) {
		t.Errorf("its lease is left: %v", err)
	}
}
