package node

import (
	"encoding/base64"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

// hdrReq is a recReq with headers (the registration signature).
type hdrReq struct {
	recReq
	hdr micro.Headers
}

func (r *hdrReq) Headers() micro.Headers { return r.hdr }

// FuzzRegistrationAndRenewal feeds random registrations (body, signing key, signature,
// agent id) and renewals (agent, workload, body) to a node with a supervised nexlet, a
// listed remote nexlet and one workload: no panic, at most one reply, and nothing is
// granted that the identity rules forbid: a registration succeeds only with a signature
// that verifies with the slot's or the listed key, under the listed name and type; a
// renewal only for the owning nexlet.
func FuzzRegistrationAndRenewal(f *testing.F) {
	slotKey, _ := nkeys.CreateUser()
	slotPub, _ := slotKey.PublicKey()
	remoteKey, _ := nkeys.CreateUser()
	remotePub, _ := remoteKey.PublicKey()
	fx := newFixture(f, 1, func(_ int, o *Options) {
		o.Minter = renewingMinter{o.Minter.(testMinter)}
		o.AllowRemoteRegistration = true
		o.RemoteNexlets = []RemoteNexlet{{Name: "wasm", Type: "wasm", PublicKey: remotePub}}
		o.FanoutTimeout = 200 * time.Millisecond
	})
	n := fx.nodes[0]
	fx.healthyAgent(n, "agent0", "go_exec", "native", nil)
	n.ExpectAgent("slot0", "slot")
	n.SetAgentKey("slot0", slotPub)
	n.mu.Lock()
	n.owned["W1"] = ownership{typ: "native", owner: "local:go_exec"}
	base := n.agents["agent0"]
	n.mu.Unlock()

	reg := `{"description":"","max_workloads":0,"name":"%s","public_xkey":"","register_type":"%s","start_request_schema":"{}","version":""}`
	for _, s := range []struct {
		body       string
		key, agent uint8
	}{
		{`{}`, 0, 0}, {reg, 1, 1}, {reg, 2, 2}, {`{"description":"","max_workloads":0,"name":"wasm","public_xkey":"","register_type":"wasm","start_request_schema":"{}","version":""}`, 2, 2},
		{`{"description":"","max_workloads":0,"name":"slot","public_xkey":"","register_type":"t","start_request_schema":"{}","version":""}`, 1, 1},
		{`{"namespace":"tenant"}`, 0, 3}, {`{"namespace":"other"}`, 3, 0},
	} {
		f.Add([]byte(s.body), s.key, s.agent, false)
	}
	f.Add([]byte(`{"public_key":"UAXXX"}`), uint8(1), uint8(1), false)
	f.Add([]byte(`{"public_key":"UAXXX","switched":true}`), uint8(1), uint8(1), true)
	keys := []nkeys.KeyPair{nil, slotKey, remoteKey}
	agents := []string{"agent0", "slot0", "remote0", "W1"}
	f.Fuzz(func(t *testing.T, data []byte, keySel, agentSel uint8, badSig bool) {
		agentID := agents[int(agentSel)%len(agents)]
		kp := keys[int(keySel)%len(keys)]
		subj := protocol.RegisterSubject(n.ID(), agentID)
		hdr := micro.Headers{}
		if kp != nil {
			pub, _ := kp.PublicKey()
			at := signingTime()
			sig, _ := kp.Sign(protocol.RegistrationPayload(subj, at, data))
			if badSig {
				sig[0] ^= 1
			}
			hdr[protocol.HeaderRegistrationKey] = []string{pub}
			hdr[protocol.HeaderRegistrationTime] = []string{at}
			hdr[protocol.HeaderRegistrationSig] = []string{base64.StdEncoding.EncodeToString(sig)}
		}
		r := &hdrReq{recReq: recReq{t: t, subject: subj, data: data}, hdr: hdr}
		n.register(r, nil) // handleRegister's work, without its goroutine: r is answered here
		if r.replies > 1 {
			t.Fatalf("register: %d replies", r.replies)
		}
		if r.replies == 1 && r.code == "" {
			var req protocol.RegisterAgentRequest
			_ = protocol.Decode(data, &req)
			switch {
			case agentID == "slot0" && (kp != slotKey || badSig):
				t.Fatalf("supervised slot registered without its key's signature: %q", data)
			case agentID == "remote0" || agentID == "W1":
				if kp != remoteKey || badSig || req.Name != "wasm" || req.RegisterType != "wasm" {
					t.Fatalf("remote registration %s accepted without the listed key, name and type: %q", agentID, data)
				}
			}
		}

		// Renewal: only the owner (agent0, or whoever registers as go_exec in its place
		// after it is gone, which the registration rules above forbid) gets creds.
		rr := &recReq{t: t, subject: protocol.RenewCredsSubject(n.ID(), agentID, "W1"), data: data}
		n.handleRenewCreds(rr)
		if rr.replies > 1 {
			t.Fatalf("renew: %d replies", rr.replies)
		}
		if rr.replies == 1 && rr.code == "" {
			n.mu.Lock()
			a := n.agents[agentID]
			n.mu.Unlock()
			if a == nil || a.owner != "local:go_exec" {
				t.Fatalf("renewal of W1 granted to %s (owner %v): %q", agentID, a, data)
			}
		}

		// A nexlet's own renewal: granted only to a registered nexlet that signed its
		// registration, signed again with that key.
		ar := &hdrReq{recReq: recReq{t: t, subject: protocol.RenewAgentCredsSubject(n.ID(), agentID), data: data}, hdr: micro.Headers{}}
		if kp != nil {
			pub, _ := kp.PublicKey()
			at := signingTime()
			sig, _ := kp.Sign(protocol.RegistrationPayload(ar.subject, at, data))
			if badSig {
				sig[0] ^= 1
			}
			ar.hdr[protocol.HeaderRegistrationKey] = []string{pub}
			ar.hdr[protocol.HeaderRegistrationTime] = []string{at}
			ar.hdr[protocol.HeaderRegistrationSig] = []string{base64.StdEncoding.EncodeToString(sig)}
		}
		n.handleRenewAgent(ar)
		if ar.replies > 1 {
			t.Fatalf("renew agent: %d replies", ar.replies)
		}
		if ar.replies == 1 && ar.code == "" {
			n.mu.Lock()
			a := n.agents[agentID]
			n.mu.Unlock()
			signer := ""
			if kp != nil {
				signer, _ = kp.PublicKey()
			}
			if a == nil || a.key == "" || a.key != signer || badSig {
				t.Fatalf("nexlet renewal of %s granted (registered %v, signed by %q, bad signature %v): %q", agentID, a != nil, signer, badSig, data)
			}
		}

		// Back to the same node for the next input.
		n.mu.Lock()
		n.agents = map[string]*registration{"agent0": base}
		base.lastSeen, base.lastBeat, base.summary.State = time.Now(), time.Now(), "running"
		n.owned["W1"] = ownership{typ: "native", owner: "local:go_exec"}
		n.mu.Unlock()
	})
}

// renewingMinter signs a nexlet renewal for any user key (a stand-in JWT), so the fuzz
// sees what the node grants, not what a minter refuses.
type renewingMinter struct{ testMinter }

func (m renewingMinter) RenewAgent(agentID, _, userPub string, _ bool) (protocol.NatsConnectionData, error) {
	return protocol.NatsConnectionData{ConnName: "agent-" + agentID, NatsUserJWT: "jwt-for-" + userPub}, nil
}
