package e2e

import (
	"bytes"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testnats"
)

// TestNexctlRunArtifactProgress: `nexctl workload run` of a nats:// artifact of a few
// MB shows the native nexlet's download as increasing byte counts of the object's size
// (plain lines off a terminal), relayed by the real node, and then the start.
func TestNexctlRunArtifactProgress(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	n.waitNative(t)
	// Acks of a few MB stored by a race-built server on a loaded machine can take more
	// than the client's default 5 s per publish (a put failed so in make test).
	js, err := jetstream.New(testnats.Connect(t, s), jetstream.WithDefaultTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(t.Context(), jetstream.ObjectStoreConfig{Bucket: "artifacts"})
	if err != nil {
		t.Fatal(err)
	}
	// A shell script padded to 4 MiB: sh never reads past its exec.
	var body bytes.Buffer
	body.WriteString("#!/bin/sh\necho artifact-ran\nexec sleep 600\n#")
	body.Write(bytes.Repeat([]byte("x"), 4<<20))
	body.WriteString("\n")
	total := body.Len()
	if _, err := obs.PutBytes(t.Context(), "big_v1", body.Bytes()); err != nil {
		t.Fatal(err)
	}

	out, errOut, code := n.ctl(t, "workload", "run", "--name", "big", "--start-request", `{"uri":"nats://artifacts/big:v1"}`)
	if code != 0 || !strings.Contains(out, "Workload big [") || !strings.Contains(out, "successfully started") {
		t.Fatalf("run: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	re := regexp.MustCompile(`(?m)^nexctl: deploying: downloading nats://artifacts/big_v1: (\d+) of (\d+) bytes \(\d+%\)$`)
	var counts []int
	for _, m := range re.FindAllStringSubmatch(errOut, -1) {
		done, _ := strconv.Atoi(m[1])
		size, _ := strconv.Atoi(m[2])
		if size != total {
			t.Fatalf("total %d, want the object's %d bytes\n%s", size, total, errOut)
		}
		counts = append(counts, done)
	}
	if len(counts) < 2 || counts[0] != 0 || counts[len(counts)-1] != total {
		t.Fatalf("byte counts %v: want 0 first and %d last\nstderr: %s", counts, total, errOut)
	}
	for i := 1; i < len(counts); i++ {
		if counts[i] <= counts[i-1] {
			t.Fatalf("byte counts not increasing: %v\nstderr: %s", counts, errOut)
		}
	}
	t.Logf("nexctl showed %d byte counts of %d", len(counts), total)
}
