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

// MaxNamespaceLen is the longest namespace a nexd node deploys into or bids in. A
// workload's minted user names its namespace in a dozen subjects, so its JWT grows by
// about 16 bytes a character (26 with a JetStream domain), and nats-server's default
// max_control_line (4 KiB) also bounds the CONNECT line carrying it: the longest
// namespace whose workload could still connect was 145 characters, 80 with a
// three-letter domain, 70 with a 32-letter one (daemon/mint TestWorkloadNamespaceBound).
// Upstream has no bound.
const MaxNamespaceLen = 64

// MaxWorkloadCredentials bounds a workload's user JWT and connection name together, as
// a node checks them at deploy: the CONNECT line carrying them must fit nats-server's
// default max_control_line (4 KiB), and the rest of that line takes about 250 bytes
// from nats.go (320 are left, for clients that send more). MaxNamespaceLen keeps a
// workload within it only with a JetStream domain of up to about 45 characters, since
// each artifact grant names the domain too (daemon/node TestLongDomainNamespaceRefused).
const MaxWorkloadCredentials = 4096 - 320

// WorkloadCredentialsSize is what MaxWorkloadCredentials bounds: the user JWT and the
// connection name.
func WorkloadCredentialsSize(cd NatsConnectionData) int {
	return len(cd.NatsUserJWT) + len(cd.ConnName)
}

// IsNamespace reports whether ns is a namespace a node serves: one subject token
// (IsToken) of at most MaxNamespaceLen characters. Allocation-free, for the auction
// intake.
func IsNamespace(ns string) bool { return len(ns) <= MaxNamespaceLen && IsToken(ns) }

// CheckNamespace is IsNamespace with the reason. A too long value is quoted cut short:
// it may be kilobytes.
func CheckNamespace(ns string) error {
	switch {
	case len(ns) > MaxNamespaceLen:
		return fmt.Errorf("namespace %q… is %d characters long, more than %d: its workloads' NATS credentials would not fit nats-server's default 4 KiB control line, so they could not connect",
			ns[:MaxNamespaceLen], len(ns), MaxNamespaceLen)
	case !IsToken(ns):
		return fmt.Errorf("namespace %+q must be one subject token of letters, digits, - or _", ns)
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
