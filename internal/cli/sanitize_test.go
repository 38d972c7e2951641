package cli

import (
	"bytes"
	"testing"
)

func TestSanitizerEscapesTerminalControl(t *testing.T) {
	for in, want := range map[string]string{
		"plain\tline\n":               "plain\tline\n",
		"\x1b[31mred\x1b[0m":          `\x1b[31mred\x1b[0m`,
		"bell\a and cr\r":             `bell\x07 and cr\x0d`,
		"csi \u009b2J and é, 🟢, ─":    `csi \u009b2J and é, 🟢, ─`,
		"del \x7f, lone \x9b2J":       `del \u007f, lone \x9b2J`,
		"ě ends in 0x9b, ÿ\xff":       "ě ends in 0x9b, ÿ\xff",
		"rlo \u202egpj.exe, 👨\u200d👩": `rlo \u202egpj.exe, 👨` + "\u200d" + `👩`,
	} {
		var b bytes.Buffer
		n, err := sanitizer{&b}.Write([]byte(in))
		if err != nil || n != len(in) || b.String() != want {
			t.Errorf("Write(%q) = %d, %v, %q; want %q", in, n, err, b.String(), want)
		}
	}
}
