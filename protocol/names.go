package protocol

import (
	"fmt"
	"regexp"
	"sync"
)

// MaxNameLen is the longest workload, nexlet or node name.
const MaxNameLen = 64

// Compiled on first use, not at init: every package's init runs in nexd and in the
// native nexlet alike, used or not.
var nameRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`) })

// CheckName validates a workload, nexlet or node name: 1-64 ASCII letters, digits,
// '.', '_' and '-', starting with a letter or digit. Names are printed in operators'
// terminals and logs, so they are data only: no control characters, no spaces.
func CheckName(what, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s must not be empty", what)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%s %q is longer than %d characters", what, name[:MaxNameLen]+"…", MaxNameLen)
	case !nameRE().MatchString(name):
		return fmt.Errorf("%s %+q: use 1-%d letters, digits, '.', '_' or '-', starting with a letter or digit", what, name, MaxNameLen)
	}
	return nil
}

// TagsMatch reports whether have holds every tag of want with the same value: a node's
// tags against an auction's, a ping's filter or a lame duck command's (the node), and
// against a deploy's when nexctl asks which node withheld its bid.
func TagsMatch(want, have map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}
