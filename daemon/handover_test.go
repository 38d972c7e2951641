package daemon

import (
	"bytes"
	"log/slog"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/daemon/mint"

	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/protocol"
)

// TestHandoverRoundTrip: what writeHandover puts in the memfd, takeHandover reads back
// (the descriptor is what the re-executed image finds in NEXD_HANDOVER_FD).
func TestHandoverRoundTrip(t *testing.T) {
	recs := []supervise.Record{{Name: "native", PID: 1234, Start: 99, Meta: map[string]string{"agent_id": "A"}}}
	user, _ := nkeys.CreateUser()
	upub, _ := user.PublicKey()
	users := mint.Users{Workloads: map[string][]string{"W1": {upub}}, Namespaces: map[string]string{"W1": "tenant"}}
	fd, err := writeHandover(handover{Nexlets: recs, Users: users})
	if err != nil {
		t.Fatal(err)
	}
	if flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); flags&unix.FD_CLOEXEC != 0 {
		t.Fatal("the handover memfd is close-on-exec: it would not reach the new image")
	}
	t.Setenv(envHandover, strconv.Itoa(fd))
	h, err := takeHandover(slog.New(slog.DiscardHandler))
	if err != nil || h == nil {
		t.Fatalf("takeHandover: %v, %v", h, err)
	}
	if len(h.Nexlets) != 1 || h.Nexlets[0].Name != "native" || h.Nexlets[0].Meta["agent_id"] != "A" {
		t.Fatalf("handed over %+v", h.Nexlets)
	}
	if !reflect.DeepEqual(h.Users, users) {
		t.Fatalf("handed over users %+v, want %+v", h.Users, users)
	}
	if _, set := os.LookupEnv(envHandover); set {
		t.Fatalf("%s still set: children would inherit it", envHandover)
	}
}

// TestHandoverCorruptFallsBack: a memfd with garbage, another version or another
// process's handover is refused with an error (the caller then rebuilds from the state
// directory), never half-used.
func TestHandoverCorruptFallsBack(t *testing.T) {
	for name, body := range map[string]string{
		"garbage":      "\x00\x01not json",
		"version":      `{"version":99,"pid":` + strconv.Itoa(os.Getpid()) + `}`,
		"other pid":    `{"version":2,"pid":1}`,
		"nameless":     `{"version":2,"pid":` + strconv.Itoa(os.Getpid()) + `,"nexlets":[{"pid":5}]}`,
		"bad user":     `{"version":2,"pid":` + strconv.Itoa(os.Getpid()) + `,"users":{"workloads":{"W1":["not-a-key"]}}}`,
		"bad id":       `{"version":2,"pid":` + strconv.Itoa(os.Getpid()) + `,"users":{"workloads":{"a.b":[]}}}`,
		"old version":  `{"version":1,"pid":` + strconv.Itoa(os.Getpid()) + `}`,
		"not a number": "",
	} {
		t.Run(name, func(t *testing.T) {
			if name == "not a number" {
				t.Setenv(envHandover, "x")
			} else {
				fd, err := unix.MemfdCreate("corrupt", 0)
				if err != nil {
					t.Fatal(err)
				}
				unix.Pwrite(fd, []byte(body), 0)
				t.Setenv(envHandover, strconv.Itoa(fd))
			}
			h, err := takeHandover(slog.New(slog.DiscardHandler))
			if err == nil || h != nil {
				t.Fatalf("corrupt handover accepted: %+v", h)
			}
			if !strings.Contains(err.Error(), "handover") && !strings.Contains(err.Error(), envHandover) {
				t.Fatalf("error does not say what: %v", err)
			}
		})
	}
}

// FuzzReadHandover: whatever the memfd holds ("$PID" stands for this process's pid, so
// the fuzzer reaches past the pid check), readHandover refuses it with an error that
// says it is the handover, or returns nexlet records the adoption can use as they are:
// each a nexlet name (one subject token, as nexd names them) given once, a pid a process can have, an
// agent id that is one subject token, and users a minter could have made.
func FuzzReadHandover(f *testing.F) {
	user, _ := nkeys.CreateUser()
	upub, _ := user.PublicKey()
	f.Add([]byte(`{"version":2,"pid":$PID,"nexlets":[{"name":"native","pid":1234,"start_time":99,"meta":{"agent_id":"A","node_id":"N"}}],"users":{"workloads":{"W1":["` + upub + `"]},"namespaces":{"W1":"tenant"}}}`))
	f.Add([]byte(`{"version":2,"pid":$PID,"nexlets":[{"name":"native","pid":5},{"name":"native","pid":6}]}`))
	f.Add([]byte(`{"version":2,"pid":$PID,"nexlets":[{"name":"../x","pid":5,"meta":{"agent_id":"a.>"}}]}`))
	f.Add([]byte(`{"version":2,"pid":$PID,"nexlets":[{"name":"native","pid":9999999999}]}`))
	f.Add([]byte(`{"version":2,"pid":$PID,"nexlets":null,"users":{"workloads":null,"namespaces":{"W":""}}}`))
	f.Add([]byte(`{"version":2,"pid":$PID}` + "\n{}"))
	f.Add([]byte("\x00\x01"))
	pid := []byte(strconv.Itoa(os.Getpid()))
	f.Fuzz(func(t *testing.T, b []byte) {
		b = bytes.ReplaceAll(b, []byte("$PID"), pid)
		h, err := readHandover(bytes.NewReader(b))
		if err != nil {
			if h != nil || !strings.Contains(err.Error(), "handover") {
				t.Fatalf("error %v with %+v", err, h)
			}
			return
		}
		seen := map[string]bool{}
		for _, r := range h.Nexlets {
			if !protocol.IsToken(r.Name) || seen[r.Name] {
				t.Fatalf("nexlet name %q accepted (twice: %v)", r.Name, seen[r.Name])
			}
			seen[r.Name] = true
			if r.PID <= 1 || r.PID > maxPID {
				t.Fatalf("nexlet %s: pid %d accepted", r.Name, r.PID)
			}
			if id := r.Meta["agent_id"]; id != "" && !protocol.IsToken(id) {
				t.Fatalf("nexlet %s: agent id %q accepted", r.Name, id)
			}
		}
		if err := h.Users.Check(); err != nil {
			t.Fatalf("users accepted: %v", err)
		}
	})
}
