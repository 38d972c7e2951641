package cli

import (
	"bytes"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// FuzzSignedAnswers: a node's signed answer with any body and any header a node may
// send (one key and value the wire carries), sent over a real server to nexctl's inbox,
// is taken as that node's (checkAnswers), once; and whatever anyone on the bus then
// sends beside it, made from it (a copy, its body or a header changed, a header added,
// blanks put before a value, its signature dropped, another node named) is refused
// with an error that says so, and no second row is taken for the node.
func FuzzSignedAnswers(f *testing.F) {
	for _, s := range []struct {
		data     string
		key, val string
		mut      uint8
		arg      string
	}{
		{`{"node_id":"x"}`, "", "", 0, ""},
		{`{}`, protocol.HeaderErrorCode, "404", 1, "x"},
		{``, "Nats-Service-Error", "workload not found", 2, "found"},
		{`[1]`, "X-A", " lead", 3, ""},
		{`null`, "X-A", "v", 4, "X-B"},
		{`{"a":1}`, "", "", 5, ""},
		{`{"a":1}`, "X", "y", 6, ""},
	} {
		f.Add([]byte(s.data), s.key, s.val, s.mut, []byte(s.arg))
	}
	s := testnats.Start(f, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(f, s)
	kp, err := nkeys.CreateServer()
	if err != nil {
		f.Fatal(err)
	}
	node, _ := kp.PublicKey()
	other, _ := nkeys.CreateServer()
	otherID, _ := other.PublicKey()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		f.Fatal(err)
	}
	const subject = "$NEX.SVC.v2.INFO.node"
	send := func(t *testing.T, m *nats.Msg) *nats.Msg {
		t.Helper()
		m.Subject = inbox
		if err := nc.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		got, err := sub.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	f.Fuzz(func(t *testing.T, data []byte, key, val string, mut uint8, arg []byte) {
		nonce := newNonce()
		h := nats.Header{}
		if wireKey(key) && key != protocol.HeaderSig && key != protocol.HeaderNode {
			h[key] = []string{val}
		}
		if err := protocol.SignAnswer(kp, node, nonce, subject, h, data); err != nil {
			t.Fatal(err)
		}
		got := send(t, &nats.Msg{Header: h, Data: data})

		v := &nats.Msg{Header: nats.Header{}, Data: bytes.Clone(got.Data)}
		for k, vs := range got.Header {
			v.Header[k] = append([]string(nil), vs...)
		}
		what := "a copy"
		switch mut % 7 {
		case 1:
			v.Data = append(v.Data, arg...)
			if len(arg) == 0 {
				v.Data = append(v.Data, 'x')
			}
			what = "its body changed"
		case 2:
			if k := firstOther(v.Header); k != "" && onWire(string(arg)) != onWire(v.Header.Get(k)) {
				v.Header[k] = []string{string(arg)}
				what = "a header changed"
			}
		case 3:
			if k := firstOther(v.Header); k != "" {
				v.Header[k] = []string{" \t" + v.Header.Get(k)}
				what = "blanks before a header value"
			}
		case 4:
			if k := string(arg); wireKey(k) && v.Header[k] == nil {
				v.Header[k] = []string{val}
				what = "a header added"
			}
		case 5:
			delete(v.Header, protocol.HeaderSig)
			what = "its signature dropped"
		case 6:
			v.Header[protocol.HeaderNode] = []string{otherID}
			what = "another node named"
		}
		variant := send(t, v)

		fl := &fleet{}
		from, errs := fl.checkAnswers([]*nats.Msg{got, variant}, subject, nonce, nil)
		if errs[0] != nil || from[0] != (answer{node: node, signed: true}) {
			t.Fatalf("node's signed answer (header %q, body %q) not taken: %+v, %v", got.Header, got.Data, from[0], errs[0])
		}
		if errs[1] == nil {
			t.Fatalf("%s (header %q, body %q) taken beside the node's answer as %+v", what, variant.Header, variant.Data, from[1])
		}
		if !strings.HasPrefix(errs[1].Error(), "answer refused: ") {
			t.Fatalf("%s refused without saying so: %v", what, errs[1])
		}
	})
}

// wireKey says whether k is a header key nats.go sends (ADR-4's printable ASCII
// but ':', less a few more).
func wireKey(k string) bool {
	if k == "" {
		return false
	}
	for _, c := range []byte(k) {
		if c <= ' ' || c >= 0x7f || strings.IndexByte("\"()/,:;<=>?@[\\]{}", c) >= 0 {
			return false
		}
	}
	return true
}

// onWire is header value v as the other end reads it (nats.go trims blanks and line
// ends around it and makes those within it blanks).
func onWire(v string) string {
	return strings.NewReplacer("\r", " ", "\n", " ").Replace(textproto.TrimString(v))
}

// firstOther is the first header of h but the signature's and the node's, "" for none.
func firstOther(h nats.Header) string {
	for k := range h {
		if k != protocol.HeaderSig && k != protocol.HeaderNode {
			return k
		}
	}
	return ""
}
