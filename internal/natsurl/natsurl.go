// Package natsurl keeps credentials embedded in NATS server URLs
// (nats://user:password@host) away from children and from output.
package natsurl

import (
	"strings"
)

// Redacted stands for a URL's userinfo.
const Redacted = "[redacted]"

// split cuts a server URL at its userinfo as nats.go reads it: the scheme (with "://",
// or "" when there is none: nats.go adds nats://, so "user:pass@host:4222" is a server
// with a password, which net/url takes for the scheme "user" and no userinfo) and what
// follows the userinfo's last '@' (net/url's split too: an unescaped '@' in a password
// belongs to it). Strings net/url cannot parse (a bad escape) are cut the same way, so
// no error path shows them whole.
func split(s string) (scheme, rest string, hasUser bool) {
	i := strings.LastIndexByte(s, '@')
	if i < 0 {
		return "", s, false
	}
	if sch, _, ok := strings.Cut(s[:i], "://"); ok {
		scheme = sch + "://"
	}
	return scheme, s[i+1:], true
}

// Strip removes the userinfo from a server URL (or each of a comma-separated list):
// the node's own NATS credentials must never reach a nexlet or a workload, which get
// their own.
func Strip(s string) string {
	return eachURL(s, func(u string) string {
		scheme, rest, ok := split(u)
		if !ok {
			return u
		}
		return scheme + rest
	})
}

// StripAll strips every URL of list.
func StripAll(list []string) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = Strip(s)
	}
	return out
}

// Redact hides a server URL's whole userinfo (or each one's of a comma-separated
// list) for display: a password, and a lone user name, which nats.go sends as a token.
func Redact(s string) string {
	return eachURL(s, func(u string) string {
		scheme, rest, ok := split(u)
		if !ok {
			return u
		}
		return scheme + Redacted + "@" + rest
	})
}

// RedactAll redacts every URL of list.
func RedactAll(list []string) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = Redact(s)
	}
	return out
}

// eachURL applies f to each URL of a comma-separated list, as nats.go splits one.
func eachURL(s string, f func(string) string) string {
	if !strings.Contains(s, ",") {
		return f(s)
	}
	parts := strings.Split(s, ",")
	for i, p := range parts {
		parts[i] = f(p)
	}
	return strings.Join(parts, ",")
}
