package config

import (
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/pflag"
)

// upstreamOnly are settings of upstream's nex CLI that mean nothing to nexd. A config
// file shared with the nex CLI (or its flags) must not stop the node, so each is
// accepted with a one-line notice saying what nexd does instead.
var upstreamOnly = map[string]struct {
	isBool bool
	notice string
}{
	"json":                  {true, "no effect in nexd: nexctl takes --json; nexd's log format is logger.format"},
	"logger.color":          {true, "no effect in nexd: logs are plain text or JSON (logger.format)"},
	"logger.short":          {true, "no effect in nexd: logs are plain text or JSON (logger.format)"},
	"logger.timefmt":        {false, "no effect in nexd: log times are RFC 3339 (the journal keeps its own)"},
	"logger.group_on_right": {true, "no effect in nexd: logs are plain text or JSON (logger.format)"},
	"logger.line_info":      {true, "no effect in nexd"},
	"disable_upgrade_check": {true, "no effect in nexd: it never checks for upgrades"},
	"auto_upgrade":          {true, "no effect in nexd: upgrades come from the package manager"},
	"dev_mode":              {true, "no effect in nexd"},
	"resource_directory":    {false, "no effect in nexd: its files live in state_dir"},
}

// upstreamNotice is the notice for an upstream-only key, "" when key is not one.
func upstreamNotice(key string) string {
	if u, ok := upstreamOnly[key]; ok {
		return key + ": " + u.notice
	}
	return ""
}

// upstreamKeys lists the upstream-only keys, sorted.
func upstreamKeys() []string {
	out := make([]string, 0, len(upstreamOnly))
	for k := range upstreamOnly {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// addUpstreamFlags registers the upstream-only flags, hidden from --help.
func addUpstreamFlags(fs *pflag.FlagSet) map[string]*string {
	vals := map[string]*string{}
	for _, k := range upstreamKeys() {
		name := strings.ReplaceAll(k, "_", "-")
		v := fs.String(name, "", upstreamOnly[k].notice)
		if upstreamOnly[k].isBool {
			fs.Lookup(name).NoOptDefVal = "true"
		}
		_ = fs.MarkHidden(name)
		vals[k] = v
	}
	return vals
}

// upstreamFlagNotices are the notices for the upstream-only flags that were given.
func upstreamFlagNotices(fs *pflag.FlagSet) []string {
	var out []string
	for _, k := range upstreamKeys() {
		if f := fs.Lookup(strings.ReplaceAll(k, "_", "-")); f != nil && f.Changed {
			out = append(out, fmt.Sprintf("flag --%s: %s", f.Name, upstreamOnly[k].notice))
		}
	}
	return out
}
