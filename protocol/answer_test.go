package protocol

import (
	"errors"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/nkeysign"
)

func TestSignedAnswer(t *testing.T) {
	kp, _ := nkeys.CreateServer()
	id, _ := kp.PublicKey()
	other, _ := nkeys.CreateServer()
	h := map[string][]string{HeaderErrorCode: {"400"}, HeaderDeployOutcome: {DeployNotStarted}, "agentId": {" a1"}}
	body := []byte(`{"error":"no"}`)
	if err := SignAnswer(kp, id, "n1", "$NEX.SVC.default.control.ADEPLOY.b", h, body); err != nil {
		t.Fatal(err)
	}
	h["agentId"] = []string{"a1"} // as nats.go reads it back: leading blanks dropped
	if node, err := VerifyAnswer("n1", "$NEX.SVC.default.control.ADEPLOY.b", h, body); err != nil || node != id {
		t.Fatalf("genuine answer: %q %v", node, err)
	}
	for name, mut := range map[string]func(h map[string][]string) (string, string, []byte){
		"other nonce": func(map[string][]string) (string, string, []byte) {
			return "n2", "$NEX.SVC.default.control.ADEPLOY.b", body
		},
		"other subject": func(map[string][]string) (string, string, []byte) {
			return "n1", "$NEX.SVC.default.control.ADEPLOY.c", body
		},
		"other body": func(map[string][]string) (string, string, []byte) {
			return "n1", "$NEX.SVC.default.control.ADEPLOY.b", []byte(`{}`)
		},
		"header dropped": func(h map[string][]string) (string, string, []byte) {
			delete(h, HeaderDeployOutcome)
			return "n1", "$NEX.SVC.default.control.ADEPLOY.b", body
		},
		"header added": func(h map[string][]string) (string, string, []byte) {
			h[HeaderProgress] = []string{"x"}
			return "n1", "$NEX.SVC.default.control.ADEPLOY.b", body
		},
		"other node named": func(h map[string][]string) (string, string, []byte) {
			oid, _ := other.PublicKey()
			h[HeaderNode] = []string{oid}
			return "n1", "$NEX.SVC.default.control.ADEPLOY.b", body
		},
	} {
		c := map[string][]string{}
		for k, v := range h {
			c[k] = v
		}
		nonce, subj, data := mut(c)
		if _, err := VerifyAnswer(nonce, subj, c, data); err == nil {
			t.Errorf("%s: verified", name)
		}
	}
	delete(h, HeaderSig)
	if _, err := VerifyAnswer("n1", "$NEX.SVC.default.control.ADEPLOY.b", h, body); !errors.Is(err, ErrUnsignedAnswer) {
		t.Errorf("unsigned: %v", err)
	}
}

// BenchmarkSignAnswer is what a nexd node adds to each answer to a client that sent a
// nonce: a deploy's answer here (its keep-alive and any progress report cost the same),
// with the node's key as the node holds it (nkeysign.Cached: the private key derived
// once).
func BenchmarkSignAnswer(b *testing.B) {
	raw, _ := nkeys.CreateServer()
	kp, err := nkeysign.Cached(raw)
	if err != nil {
		b.Fatal(err)
	}
	id, _ := kp.PublicKey()
	body := []byte(`{"id":"2mYlHpKxCz1HJNq0Z2kB8S","name":"web"}`)
	b.ReportAllocs()
	for b.Loop() {
		h := map[string][]string{}
		if err := SignAnswer(kp, id, "Q2lqYmF1dGhvcml6ZWQ", "$NEX.SVC.default.control.ADEPLOY.Xk3bQ9", h, body); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyAnswer(b *testing.B) {
	kp, _ := nkeys.CreateServer()
	id, _ := kp.PublicKey()
	body := []byte(`{"id":"2mYlHpKxCz1HJNq0Z2kB8S","name":"web"}`)
	h := map[string][]string{}
	if err := SignAnswer(kp, id, "Q2lqYmF1dGhvcml6ZWQ", "$NEX.SVC.default.control.ADEPLOY.Xk3bQ9", h, body); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := VerifyAnswer("Q2lqYmF1dGhvcml6ZWQ", "$NEX.SVC.default.control.ADEPLOY.Xk3bQ9", h, body); err != nil {
			b.Fatal(err)
		}
	}
}
