package protocol

import (
	"fmt"
	"strconv"
	"strings"
)

// Progress is one report of how a long operation goes: the text of HeaderProgress and,
// for a transfer, bytes done of Total (HeaderProgressBytes; Total 0 when unknown).
type Progress struct {
	Text        string
	Done, Total int64
}

// HasBytes says whether p counts bytes.
func (p Progress) HasBytes() bool { return p.Done > 0 || p.Total > 0 }

// FormatProgressBytes is HeaderProgressBytes' value for done of total bytes.
func FormatProgressBytes(done, total int64) string { return fmt.Sprintf("%d/%d", done, total) }

// ParseProgressBytes reads HeaderProgressBytes' value; ok is false for anything else.
func ParseProgressBytes(s string) (done, total int64, ok bool) {
	a, b, found := strings.Cut(s, "/")
	if !found {
		return 0, 0, false
	}
	d, err1 := strconv.ParseInt(a, 10, 64)
	t, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || d < 0 || t < 0 {
		return 0, 0, false
	}
	return d, t, true
}
