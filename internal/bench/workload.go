package bench

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// workloadTagEnv carries the name the tool deployed the NATS workload under.
const workloadTagEnv = "NEXBENCH_TAG"

// RunWorkload is the NATS workload (`nexbench workload`): it connects with the
// credentials the native nexlet put in its environment, announces itself on
// nexbench.ready.<NEX_WORKLOAD_ID>, drops the connection (so a thousand of them cost
// the server nothing) and waits until ctx ends (SIGTERM from the nexlet).
func RunWorkload(ctx context.Context, env func(string) string) error {
	// Upstream's native nexlet does not set NEX_WORKLOAD_ID; the tool's tag stands in.
	id := cmp.Or(env("NEX_WORKLOAD_ID"), env(workloadTagEnv))
	servers := env("NEX_WORKLOAD_NATS_SERVERS")
	if id == "" || servers == "" {
		return errors.New("workload: NEX_WORKLOAD_ID (or " + workloadTagEnv + ") and NEX_WORKLOAD_NATS_SERVERS must be set (run me through a node)")
	}
	opts := []nats.Option{nats.Name("nexbench-workload-" + id), nats.Timeout(10 * time.Second)}
	seed := env("NEX_WORKLOAD_NATS_NKEY")
	jwtB64 := env("NEX_WORKLOAD_NATS_B64_JWT")
	if seed != "" {
		jwtRaw, err := base64.StdEncoding.DecodeString(jwtB64)
		if err != nil {
			return fmt.Errorf("workload: NEX_WORKLOAD_NATS_B64_JWT: %w", err)
		}
		if len(jwtRaw) > 0 {
			opts = append(opts, nats.UserJWTAndSeed(string(jwtRaw), seed))
		} else {
			kp, err := nkeys.FromSeed([]byte(seed))
			if err != nil {
				return fmt.Errorf("workload: NEX_WORKLOAD_NATS_NKEY: %w", err)
			}
			pub, _ := kp.PublicKey()
			opts = append(opts, nats.Nkey(pub, func(nonce []byte) ([]byte, error) { return kp.Sign(nonce) }))
		}
	}
	nc, err := nats.Connect(servers, opts...)
	if err != nil {
		return fmt.Errorf("workload: connect to %s: %w", servers, err)
	}
	if err := nc.Publish(ReadySubjectPrefix+"."+id, []byte(strconv.Itoa(os.Getpid()))); err != nil {
		nc.Close()
		return fmt.Errorf("workload: announce: %w", err)
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		nc.Close()
		return fmt.Errorf("workload: announce: %w", err)
	}
	nc.Close()
	<-ctx.Done()
	return nil
}
