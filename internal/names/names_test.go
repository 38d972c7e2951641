package names

import (
	"regexp"
	"strings"
	"testing"
)

// TestValidMatchesTheRegexps: each use agrees with the regular expression it replaces,
// on edge lengths, every ASCII byte in either position, and non-ASCII input.
func TestValidMatchesTheRegexps(t *testing.T) {
	for _, c := range []struct {
		re          string
		first, rest Class
		max         int
	}{
		{`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`, Alnum | Underscore, Alnum | Underscore | Dot | Dash, 128},
		{`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$`, Alnum | Underscore, Alnum | Underscore | Dot | Dash, 255},
		{`^[A-Za-z0-9_-]{1,128}$`, Alnum | Underscore | Dash, Alnum | Underscore | Dash, 128},
		{`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`, Alnum, Alnum | Underscore | Dash, 63},
	} {
		re := regexp.MustCompile(c.re)
		inputs := []string{"", "a", "é", "aé", "a\n", "\na", strings.Repeat("a", c.max-1), strings.Repeat("a", c.max),
			strings.Repeat("a", c.max+1), "a b", "a/b", "a\x00"}
		for b := 0; b < 256; b++ {
			inputs = append(inputs, string([]byte{byte(b)}), "a"+string([]byte{byte(b)}), string([]byte{byte(b)})+"a")
		}
		for _, in := range inputs {
			if got, want := Valid(in, c.first, c.rest, c.max), re.MatchString(in); got != want {
				t.Errorf("%s: Valid(%q) = %v, the regexp says %v", c.re, in, got, want)
			}
		}
	}
}
