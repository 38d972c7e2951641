package daemon

import (
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
