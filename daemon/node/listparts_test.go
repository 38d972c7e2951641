package node

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

func partMsg(h string, data string) *nats.Msg {
	m := &nats.Msg{Subject: "_INBOX.x.tok", Data: []byte(data)}
	if h != "" {
		m.Header = nats.Header{protocol.HeaderListPart: {h}}
	}
	return m
}

// TestListPartsJoin: parts in order join into one array of their rows; a reply not in
// parts is the answer as it is; parts out of order, broken off, badly numbered or not
// arrays make the answer an error naming what was wrong, so the nexlet counts as
// failed (its workloads missing from a list said to be partial), never as listing less.
func TestListPartsJoin(t *testing.T) {
	type step struct{ h, data string }
	for _, tc := range []struct {
		name  string
		steps []step
		rows  []string // the joined answer's ids; nil: want an error
		err   string
	}{
		{"one message", []step{{"", `[{"id":"a"}]`}}, []string{"a"}, ""},
		{"three parts", []step{{"1/3", `[{"id":"a"},{"id":"b"}]`}, {"2/3", ` [ ] `}, {"3/3", `[{"id":"c"}]`}}, []string{"a", "b", "c"}, ""},
		{"one part", []step{{"1/1", `[{"id":"a"}]`}}, []string{"a"}, ""},
		{"begun with 2", []step{{"2/2", `[]`}}, nil, "begun with part"},
		{"out of order", []step{{"1/3", `[]`}, {"3/3", `[]`}}, nil, "where 2/3 was due"},
		{"count changed", []step{{"1/3", `[]`}, {"2/4", `[]`}}, nil, "where 2/3 was due"},
		{"broken off", []step{{"1/2", `[]`}, {"", `[{"id":"a"}]`}}, nil, "broken off after part 1 of 2"},
		{"bad number", []step{{"x/2", `[]`}}, nil, "is not i/n"},
		{"zero", []step{{"0/0", `[]`}}, nil, "is not i/n"},
		{"past n", []step{{"3/2", `[]`}}, nil, "is not i/n"},
		{"not an array", []step{{"1/2", `[]`}, {"2/2", `{"id":"a"}`}}, nil, "part 2 of 2 of an answer in parts is not a JSON array"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := &listParts{byToken: map[string]*partialList{}}
			var got *nats.Msg
			for i, s := range tc.steps {
				m, ok := l.add("tok", partMsg(s.h, s.data))
				if ok != (i == len(tc.steps)-1) {
					t.Fatalf("step %d (%s): done %t", i, s.h, ok)
				}
				got = m
			}
			if tc.rows == nil {
				if !isErrorReply(got) || !strings.Contains(got.Header.Get(protocol.HeaderError), tc.err) {
					t.Errorf("answer %v %s, want an error with %q", got.Header, got.Data, tc.err)
				}
				return
			}
			var list []protocol.WorkloadSummary
			if isErrorReply(got) {
				t.Fatalf("error %v", got.Header)
			}
			if err := json.Unmarshal(got.Data, &list); err != nil {
				t.Fatalf("%s: %v", got.Data, err)
			}
			var ids []string
			for _, w := range list {
				ids = append(ids, w.ID)
			}
			if fmt.Sprint(ids) != fmt.Sprint(tc.rows) {
				t.Errorf("rows %v, want %v", ids, tc.rows)
			}
		})
	}
}

// TestListPartsBound: a nexlet's parts beyond maxListBytes end its answer as an error,
// and the node holds no more of them.
func TestListPartsBound(t *testing.T) {
	l := &listParts{byToken: map[string]*partialList{}}
	big := "[" + strings.Repeat(" ", 1<<20) + "]"
	for i := 1; ; i++ {
		m, ok := l.add("tok", partMsg(fmt.Sprintf("%d/1000", i), big))
		if !ok {
			continue
		}
		if i*len(big) <= maxListBytes || !strings.Contains(m.Header.Get(protocol.HeaderError), "more than") {
			t.Fatalf("after %d parts of %d bytes: %v", i, len(big), m.Header)
		}
		return
	}
}

// FuzzListParts: whatever parts a nexlet sends, add neither panics nor hands on an
// answer that is not its own message, an error, or a JSON array joined from its parts.
func FuzzListParts(f *testing.F) {
	f.Add("1/2", `[{"id":"a"}]`, "2/2", `[]`)
	f.Add("1/1", `[`, "", `]`)
	f.Add("", `null`, "1/2", `[1`)
	f.Fuzz(func(t *testing.T, h1, d1, h2, d2 string) {
		l := &listParts{byToken: map[string]*partialList{}}
		for _, s := range [][2]string{{h1, d1}, {h2, d2}} {
			in := partMsg(s[0], s[1])
			m, ok := l.add("tok", in)
			if !ok {
				continue
			}
			if d := m.Data; m != in && !isErrorReply(m) && (len(d) < 2 || d[0] != '[' || d[len(d)-1] != ']') {
				t.Fatalf("answer %q from parts %q %q / %q %q", m.Data, h1, d1, h2, d2)
			}
			return
		}
	})
}

// FuzzListPartsJoin: one to three parts numbered in order make the answer of the rows of
// the parts, in order, when each is a JSON array; otherwise an error reply that names the
// first part that is not. Before, a part was only checked to begin with '[' and end with
// ']', so the parts `["a]` and `[b"]` were joined to `["a,b"]`, one row neither part had.
func FuzzListPartsJoin(f *testing.F) {
	f.Add(`[{"id":"a"}]`, ` [ ] `, `[1,"x"]`, uint8(2))
	f.Add(`["a]`, `[b"]`, ``, uint8(1))
	f.Add(`[1]`, `{}`, ``, uint8(1))
	f.Add(`[`, `]`, `[]`, uint8(2))
	f.Fuzz(func(t *testing.T, a, b, c string, n uint8) {
		parts := []string{a, b, c}[:n%3+1]
		l := &listParts{byToken: map[string]*partialList{}}
		var got *nats.Msg
		for i, p := range parts {
			m, ok := l.add("tok", partMsg(fmt.Sprintf("%d/%d", i+1, len(parts)), p))
			if ok != (i == len(parts)-1) {
				t.Fatalf("part %d of %d: done %t (%v)", i+1, len(parts), ok, m)
			}
			got = m
		}
		var want []json.RawMessage
		bad := 0
		for i, p := range parts {
			var rows []json.RawMessage
			if err := json.Unmarshal([]byte(p), &rows); err != nil || rows == nil {
				bad = i + 1
				break
			}
			want = append(want, rows...)
		}
		if bad > 0 {
			what := fmt.Sprintf("part %d of %d of an answer in parts is not a JSON array", bad, len(parts))
			if !isErrorReply(got) || !strings.Contains(got.Header.Get(protocol.HeaderError), what) {
				t.Fatalf("parts %q: answer %v %q, want an error naming part %d", parts, got.Header, got.Data, bad)
			}
			return
		}
		var rows []json.RawMessage
		if isErrorReply(got) || json.Unmarshal(got.Data, &rows) != nil || len(rows) != len(want) {
			t.Fatalf("parts %q: answer %v %q, want the %d rows %q", parts, got.Header, got.Data, len(want), want)
		}
		for i := range rows {
			if !bytes.Equal(compact(t, rows[i]), compact(t, want[i])) {
				t.Fatalf("parts %q: row %d is %s, want %s", parts, i, rows[i], want[i])
			}
		}
	})
}

func compact(t *testing.T, b []byte) []byte {
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}
