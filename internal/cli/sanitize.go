package cli

import (
	"fmt"
	"io"
	"strings"
)

// sanitizer is how nexctl writes everything it prints: names, log lines and error
// messages come from the network (a workload named "\x1b[31m..." must not drive the
// operator's terminal), so control characters other than newline and tab are shown
// escaped (\x1b, \u009b) instead of being written.
type sanitizer struct{ w io.Writer }

func (s sanitizer) Write(p []byte) (int, error) {
	clean := true
	for i := 0; i < len(p); i++ {
		if isControl(p, i) {
			clean = false
			break
		}
	}
	if clean {
		return s.w.Write(p)
	}
	out := make([]byte, 0, len(p)+16)
	for i := 0; i < len(p); i++ {
		switch {
		case p[i] == 0xc2 && i+1 < len(p) && p[i+1] >= 0x80 && p[i+1] <= 0x9f:
			out = fmt.Appendf(out, `\u%04x`, p[i+1])
			i++
		case isControl(p, i):
			out = fmt.Appendf(out, `\x%02x`, p[i])
		default:
			out = append(out, p[i])
		}
	}
	if _, err := s.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// isControl: a C0 control byte other than \n and \t, DEL, or the UTF-8 form of a C1
// control (U+0080-U+009F, which some terminals obey like ESC sequences).
func isControl(p []byte, i int) bool {
	b := p[i]
	switch {
	case b == '\n' || b == '\t':
		return false
	case b < 0x20 || b == 0x7f:
		return true
	case b == 0xc2 && i+1 < len(p) && p[i+1] >= 0x80 && p[i+1] <= 0x9f:
		return true
	}
	return false
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
