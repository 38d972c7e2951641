package names

import (
	"regexp"
	"testing"
)

// FuzzValidMatchesTheRegexps: Valid agrees with each regular expression it replaced on
// any input (go test -fuzz FuzzValidMatchesTheRegexps ./internal/names).
func FuzzValidMatchesTheRegexps(f *testing.F) {
	cases := []struct {
		re          *regexp.Regexp
		first, rest Class
		max         int
	}{
		{regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`), Alnum | Underscore, Alnum | Underscore | Dot | Dash, 128},
		{regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$`), Alnum | Underscore, Alnum | Underscore | Dot | Dash, 255},
		{regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`), Alnum | Underscore | Dash, Alnum | Underscore | Dash, 128},
		{regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`), Alnum, Alnum | Underscore | Dash, 63},
	}
	for _, s := range []string{"", "a", "-a", ".a", "a.b-c_d", "a\n", "\u00e9", "a\x00b", "K\u212a"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, c := range cases {
			if got, want := Valid(s, c.first, c.rest, c.max), c.re.MatchString(s); got != want {
				t.Errorf("%s: Valid(%q) = %v, the regexp says %v", c.re, s, got, want)
			}
		}
	})
}
