package cli

import (
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// sanitizer is how nexctl writes everything it prints: names, log lines and error
// messages come from the network (a workload named "\x1b[31m..." must not drive the
// operator's terminal), so control characters other than newline and tab, and the
// bidi controls, are shown escaped (\x1b, \u007f, \u009b, \u202e) instead of being
// written. DEL, the C1 and the bidi controls are written as JSON escapes, which say
// the same inside a --json string (json.Marshal writes them raw, and C0 controls
// escaped): before, DEL became \x7f, which is no JSON, and `logs --json` printed lines
// a JSON reader refused.
type sanitizer struct{ w io.Writer }

func (s sanitizer) Write(p []byte) (int, error) {
	clean := true
	for _, b := range p {
		if b < 0x20 && b != '\n' && b != '\t' || b >= 0x7f {
			clean = false // a control, or UTF-8 to look at rune by rune
			break
		}
	}
	if clean {
		return s.w.Write(p)
	}
	out := make([]byte, 0, len(p)+16)
	for i := 0; i < len(p); {
		r, n := utf8.DecodeRune(p[i:])
		switch {
		case r == utf8.RuneError && n == 1 && p[i] >= 0x80 && p[i] <= 0x9f:
			// A byte of no UTF-8 sequence that a terminal in an 8-bit locale obeys as
			// a C1 control (0x9b is CSI, ESC [): before, it went through as it came.
			out = fmt.Appendf(out, `\x%02x`, p[i])
		case r < 0x20 && r != '\n' && r != '\t':
			out = fmt.Appendf(out, `\x%02x`, r)
		case r >= 0x7f && r <= 0x9f, isBidiControl(r):
			out = fmt.Appendf(out, `\u%04x`, r)
		default:
			out = append(out, p[i:i+n]...)
		}
		i += n
	}
	if _, err := s.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// terminal is the writer under w's sanitizer: for the control sequences nexctl itself
// writes to a terminal (a redraw in place), never for text from the network, which
// goes through the sanitizer or escapeControls.
func terminal(w io.Writer) io.Writer {
	if s, ok := w.(sanitizer); ok {
		return s.w
	}
	return w
}

// escapeControls is s as the sanitizer writes it.
func escapeControls(s string) string {
	var b strings.Builder
	_, _ = sanitizer{&b}.Write([]byte(s))
	return b.String()
}

// isBidiControl reports the Unicode bidi controls (marks, embeddings, overrides and
// isolates): a terminal that does bidi reorders what follows them, so a name or a
// line could show text other than what it holds ("Trojan Source").
func isBidiControl(r rune) bool {
	switch {
	case r == 0x061c, r == 0x200e, r == 0x200f:
		return true
	case r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
		return true
	}
	return false
}
