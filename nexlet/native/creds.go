package native

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"

	"github.com/nexd-project/nexd/internal/wallclock"
	"github.com/nexd-project/nexd/protocol"
)

// EnvCredsFile names the workload's NATS credentials file (JWT and seed, the format of
// nats.UserCredentials). It is set only when the workload's credentials carry a JWT.
// The file is rewritten before the JWT expires; nats.go reads it on every (re)connect,
// so a client using nats.UserCredentials(path) survives the expiry of its first JWT.
const EnvCredsFile = "NEX_WORKLOAD_NATS_CREDS_FILE"

// credsFileName is the creds file in the workload's private directory.
const credsFileName = "nats.creds"

// RenewTimeout bounds one renewal request to the node.
const RenewTimeout = 10 * time.Second

// CredsRenewer gets fresh credentials for a running workload from the node;
// *nexlet.Runner implements it. A Feed that does not implement it disables renewal.
type CredsRenewer interface {
	RenewWorkloadCreds(ctx context.Context, workloadID, namespace string) (protocol.NatsConnectionData, error)
}

func (n *Nexlet) credsPath(id string) string {
	return filepath.Join(n.wdir, id, credsFileName)
}

// writeCredsFile writes cd as a creds file, atomically (a reconnecting client never
// reads half a file), mode 0400 and owned by the workload's user (the directory stays
// the nexlet's, so the workload cannot swap the file). Without a JWT there is nothing
// to write.
func writeCredsFile(path string, cd protocol.NatsConnectionData, id ident) error {
	if cd.NatsUserJWT == "" {
		return nil
	}
	b, err := jwt.FormatUserConfig(cd.NatsUserJWT, []byte(cd.NatsUserSeed))
	if err != nil {
		return fmt.Errorf("creds file %s: %w", path, err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+credsFileName+"-*")
	if err != nil {
		return fmt.Errorf("creds file %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(b) // CreateTemp makes it 0600
	if err == nil {
		err = f.Chmod(0o400)
	}
	if err == nil && !id.same {
		err = f.Chown(int(id.uid), int(id.gid))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("creds file %s: %w", path, err)
	}
	return nil
}

// credsEnv returns env with the NATS credential variables set from cd, so that a
// restarted process starts with the newest credentials.
func credsEnv(env []string, cd protocol.NatsConnectionData) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		switch k, _, _ := strings.Cut(kv, "="); k {
		case "NEX_WORKLOAD_NATS_NKEY":
			kv = k + "=" + cd.NatsUserSeed
		case "NEX_WORKLOAD_NATS_B64_JWT":
			kv = k + "=" + base64.StdEncoding.EncodeToString([]byte(cd.NatsUserJWT))
		}
		out = append(out, kv)
	}
	return out
}

// renewAt is when credentials should be renewed, by the wall clock: at 80% of the
// JWT's lifetime. ok is false when they do not expire (no JWT, or no expiry).
func renewAt(cd protocol.NatsConnectionData) (at time.Time, life time.Duration, ok bool) {
	if cd.NatsUserJWT == "" {
		return time.Time{}, 0, false
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil || uc.Expires == 0 {
		return time.Time{}, 0, false
	}
	iat, exp := time.Unix(uc.IssuedAt, 0), time.Unix(uc.Expires, 0)
	life = exp.Sub(iat)
	return iat.Add(life * 8 / 10), life, true
}

// scheduleRenewalLocked arms the renewal of w's current credentials at at, by the wall
// clock (n.now), by which the server expires them: a wall clock stepped ahead by a
// pause of the host or its VM delays the renewal by at most one slice of the fifth
// of life left after at (wallclock). n.mu is held.
func (n *Nexlet) scheduleRenewalLocked(w *workload, at time.Time, life time.Duration) {
	if w.renewStopped {
		return
	}
	if w.renewTimer != nil {
		w.renewTimer.Stop()
	}
	w.renewTimer = wallclock.AfterFunc(at, wallclock.Slice(life/5), n.now, func() { n.renew(w) })
}

// startRenewal starts renewing w's credentials while it runs (no-op without a JWT with
// an expiry, or without a renewer).
func (n *Nexlet) startRenewal(w *workload) {
	n.mu.Lock()
	defer n.mu.Unlock()
	at, life, ok := renewAt(w.creds)
	if !ok {
		return
	}
	if _, can := n.feed.(CredsRenewer); !can {
		n.log.Warn("workload credentials expire and cannot be renewed by this nexlet", "workload_id", w.id)
		return
	}
	n.scheduleRenewalLocked(w, at, life)
}

// stopRenewal ends renewal for good; no creds file is written after it returns.
func (n *Nexlet) stopRenewal(w *workload) {
	n.mu.Lock()
	defer n.mu.Unlock()
	w.renewStopped = true
	if w.renewTimer != nil {
		w.renewTimer.Stop()
	}
}

// renew asks the node for fresh credentials, rewrites the creds file and arms the next
// renewal; on failure it retries well before the current credentials run out.
func (n *Nexlet) renew(w *workload) {
	select {
	case <-n.abandon:
		return
	default:
	}
	r, ok := n.feed.(CredsRenewer)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), RenewTimeout)
	cd, err := r.RenewWorkloadCreds(ctx, w.id, w.ns)
	cancel()
	n.mu.Lock()
	defer n.mu.Unlock()
	if w.renewStopped {
		return
	}
	var next time.Time
	var life time.Duration
	if err == nil {
		if next, life, ok = renewAt(cd); !ok {
			err = fmt.Errorf("the renewed credentials of workload %s carry no JWT expiry", w.id)
		}
	}
	if err == nil {
		// Under n.mu so that it cannot race the removal of the workload's directory.
		err = writeCredsFile(n.credsPath(w.id), cd, w.ident)
	}
	if err != nil {
		_, life, _ := renewAt(w.creds)
		retry := min(max(life/10, time.Second), 30*time.Second)
		n.log.Warn("workload credentials not renewed; retrying", "workload_id", w.id, "namespace", w.ns, "retry_in", retry, "err", err)
		n.scheduleRenewalLocked(w, n.now().Add(retry), life)
		return
	}
	w.creds = cd
	w.env = credsEnv(w.env, cd)
	n.log.Info("workload credentials renewed", "workload_id", w.id, "namespace", w.ns, "lifetime", life, "next_renewal_in", next.Sub(n.now()).Round(time.Millisecond))
	n.scheduleRenewalLocked(w, next, life)
}
