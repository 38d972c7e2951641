// Package natsurl keeps credentials embedded in NATS server URLs
// (nats://user:password@host) away from children and from output.
package natsurl

import (
	"net/url"
	"strings"
)

// Redacted replaces the password of a URL's userinfo.
const Redacted = "[redacted]"

// Strip removes the userinfo from a server URL: the node's own NATS credentials must
// never reach a nexlet or a workload, which get their own. A string that does not
// parse as a URL is returned without anything before its last '@'.
func Strip(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if i := strings.LastIndexByte(s, '@'); i >= 0 {
			scheme, _, ok := strings.Cut(s, "://")
			if ok {
				return scheme + "://" + s[i+1:]
			}
			return s[i+1:]
		}
		return s
	}
	if u.User == nil {
		return s
	}
	u.User = nil
	return u.String()
}

// StripAll strips every URL of list.
func StripAll(list []string) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = Strip(s)
	}
	return out
}

// Redact hides a URL's password (and a lone user name, which is often a token) for
// display.
func Redact(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if strings.Contains(s, "@") {
			return Redacted
		}
		return s
	}
	if u.User == nil {
		return s
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "REDACTED")
	} else {
		u.User = url.User("REDACTED")
	}
	return strings.Replace(u.String(), "REDACTED", Redacted, 1)
}

// RedactAll redacts every URL of list.
func RedactAll(list []string) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = Redact(s)
	}
	return out
}
