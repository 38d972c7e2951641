// Package names checks names made of a few ASCII character classes without a regular
// expression: a bounded repetition such as [A-Za-z0-9_.-]{0,254} compiles to hundreds
// of states, and as a package variable that compile was paid at every start of nexd and
// of the native nexlet (one binary, one package init), before either did anything.
package names

// Class is a set of ASCII characters.
type Class uint8

// The classes a name's characters may come from (combine with |).
const (
	Alnum      Class = 1 << iota // A-Z a-z 0-9
	Underscore                   // _
	Dash                         // -
	Dot                          // .
)

func (c Class) has(b byte) bool {
	switch {
	case b >= 'a' && b <= 'z', b >= 'A' && b <= 'Z', b >= '0' && b <= '9':
		return c&Alnum != 0
	case b == '_':
		return c&Underscore != 0
	case b == '-':
		return c&Dash != 0
	case b == '.':
		return c&Dot != 0
	}
	return false
}

// Valid says whether s is 1 to maxLen characters, the first from first and the others
// from rest: the regular expression ^[first][rest]{0,maxLen-1}$.
func Valid(s string, first, rest Class, maxLen int) bool {
	if len(s) == 0 || len(s) > maxLen || !first.has(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if !rest.has(s[i]) {
			return false
		}
	}
	return true
}
