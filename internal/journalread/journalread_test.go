package journalread

import (
	"testing"
	"time"
)

// TestParse: journalctl -o json entries as nexd writes them become lines with their
// stream and time; binary lines and other output are skipped.
func TestParse(t *testing.T) {
	out := []byte(`{"__REALTIME_TIMESTAMP":"1764590400000001","MESSAGE":"workload output","LINE":"hello","NEXLET_STREAM":"stdout","NEX_WORKLOAD_ID":"W1"}
{"__REALTIME_TIMESTAMP":"1764590400000002","MESSAGE":"workload output","LINE":[104,105,255],"NEXLET_STREAM":"stdout"}
not json
{"__REALTIME_TIMESTAMP":"1764590401000000","MESSAGE":"workload output","LINE":"oops","STREAM":"stderr"}
`)
	lines, err := parse(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 2 {
		t.Fatalf("lines %+v", lines)
	}
	if l := lines[0]; l.Line != "hello" || l.Stream != "stdout" || !l.Time.Equal(time.UnixMicro(1764590400000001)) {
		t.Errorf("first %+v", l)
	}
	if l := lines[1]; l.Line != "oops" || l.Stream != "stderr" {
		t.Errorf("second (older nexd: STREAM) %+v", l)
	}
}
