package config

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nkeys"
)

// problem is one decoding failure; sub is appended to the key path ("[1].uri").
type problem struct {
	sub string
	msg string
}

func probs(msg string) []problem { return []problem{{msg: msg}} }

// jsonType names a JSON-decoded value's type for error messages.
func jsonType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case float64, json.Number:
		return "a number"
	case map[string]any:
		return "an object"
	case []any:
		return "an array"
	}
	return fmt.Sprintf("a %T", v)
}

// decodeJSON converts a value from a JSON file to the key's typed value.
func decodeJSON(s *keySpec, v any) (any, []problem) {
	switch s.kind {
	case kString:
		if x, ok := v.(string); ok {
			return x, nil
		}
		return nil, probs("expected a string, got " + jsonType(v))
	case kBool:
		if x, ok := v.(bool); ok {
			return x, nil
		}
		return nil, probs("expected true or false, got " + jsonType(v))
	case kInt:
		return jsonInt(v)
	case kFloat:
		x, ok := v.(float64)
		if !ok {
			return nil, probs("expected a number, got " + jsonType(v))
		}
		return x, nil
	case kDuration:
		x, ok := v.(string)
		if !ok {
			return nil, probs("expected a duration string such as \"5s\" or \"1m30s\", got " + jsonType(v))
		}
		return parseDuration(x)
	case kList:
		switch x := v.(type) {
		case string:
			return splitList(x), nil
		case []any:
			out := make([]string, 0, len(x))
			var ps []problem
			for i, e := range x {
				str, ok := e.(string)
				if !ok {
					ps = append(ps, problem{fmt.Sprintf("[%d]", i), "expected a string, got " + jsonType(e)})
					continue
				}
				out = append(out, str)
			}
			if ps != nil {
				return nil, ps
			}
			return out, nil
		}
		return nil, probs("expected an array of strings, got " + jsonType(v))
	case kMap:
		return jsonStringMap(v)
	case kSize:
		switch x := v.(type) {
		case float64:
			if x < 0 || x != math.Trunc(x) || x > math.MaxInt64/2 {
				return nil, probs(fmt.Sprintf("expected a whole number of bytes >= 0, got %v", x))
			}
			return int64(x), nil
		case string:
			return parseSize(x)
		}
		return nil, probs("expected a size such as 268435456, \"256M\" or \"max\", got " + jsonType(v))
	case kAgents:
		return jsonAgents(v)
	case kRemoteNexlets:
		return jsonRemoteNexlets(v)
	}
	return nil, probs("unsupported setting type")
}

func jsonInt(v any) (any, []problem) {
	x, ok := v.(float64)
	if !ok {
		return nil, probs("expected a whole number, got " + jsonType(v))
	}
	if x != math.Trunc(x) || math.Abs(x) > 1<<53 {
		return nil, probs(fmt.Sprintf("expected a whole number, got %v", x))
	}
	return int64(x), nil
}

func jsonStringMap(v any) (any, []problem) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, probs("expected an object of string values such as {\"k\": \"v\"}, got " + jsonType(v))
	}
	out := make(map[string]string, len(obj))
	var ps []problem
	for _, k := range sortedKeys(obj) {
		str, ok := obj[k].(string)
		if !ok {
			ps = append(ps, problem{"." + k, "expected a string, got " + jsonType(obj[k])})
			continue
		}
		out[k] = str
	}
	if ps != nil {
		return nil, ps
	}
	return out, nil
}

var (
	agentKeys  = []string{"uri", "argv", "env", "limits", "unsigned_registration"}
	remoteKeys = []string{"name", "type", "public_key"}
	limitsKeys = []string{"memory_max", "memory_high", "cpu_max", "pids_max"}
)

func jsonRemoteNexlets(v any) (any, []problem) {
	arr, ok := v.([]any)
	if !ok {
		return nil, probs("expected an array of {\"name\", \"type\", \"public_key\"} objects, got " + jsonType(v))
	}
	out := make([]RemoteNexlet, 0, len(arr))
	var ps []problem
	for i, e := range arr {
		at := fmt.Sprintf("[%d]", i)
		obj, ok := e.(map[string]any)
		if !ok {
			ps = append(ps, problem{at, "expected an object with \"name\", \"type\", \"public_key\", got " + jsonType(e)})
			continue
		}
		var rn RemoteNexlet
		for _, k := range sortedKeys(obj) {
			str, isStr := obj[k].(string)
			switch {
			case !slices.Contains(remoteKeys, k):
				ps = append(ps, problem{at + "." + k, unknownMsg(k, remoteKeys)})
				continue
			case !isStr || str == "":
				ps = append(ps, problem{at + "." + k, "expected a non-empty string, got " + jsonType(obj[k])})
				continue
			}
			switch k {
			case "name":
				rn.Name = str
			case "type":
				rn.Type = str
			case "public_key":
				if !nkeys.IsValidPublicKey(str) {
					// describeKey: a seed pasted here by mistake is not shown.
					ps = append(ps, problem{at + ".public_key", fmt.Sprintf("expected an nkey public key, got %s", describeKey(str))})
				}
				rn.PublicKey = str
			}
		}
		for _, k := range remoteKeys {
			if _, ok := obj[k]; !ok {
				ps = append(ps, problem{at + "." + k, "is required"})
			}
		}
		out = append(out, rn)
	}
	if ps != nil {
		return nil, ps
	}
	return out, nil
}

func jsonAgents(v any) (any, []problem) {
	arr, ok := v.([]any)
	if !ok {
		return nil, probs("expected an array of {\"uri\", \"argv\", \"env\", \"limits\"} objects, got " + jsonType(v))
	}
	out := make([]Agent, 0, len(arr))
	var ps []problem
	for i, e := range arr {
		at := fmt.Sprintf("[%d]", i)
		obj, ok := e.(map[string]any)
		if !ok {
			ps = append(ps, problem{at, "expected an object with \"uri\", \"argv\", \"env\", got " + jsonType(e)})
			continue
		}
		var a Agent
		for _, k := range sortedKeys(obj) {
			val := obj[k]
			switch k {
			case "uri":
				if str, ok := val.(string); ok {
					a.URI = str
				} else {
					ps = append(ps, problem{at + ".uri", "expected a string, got " + jsonType(val)})
				}
			case "argv":
				spec := &keySpec{kind: kList}
				if _, isStr := val.(string); isStr {
					ps = append(ps, problem{at + ".argv", "expected an array of strings, got a string"})
					continue
				}
				x, p := decodeJSON(spec, val)
				for _, q := range p {
					ps = append(ps, problem{at + ".argv" + q.sub, q.msg})
				}
				if p == nil {
					a.Argv = x.([]string)
				}
			case "env":
				x, p := jsonStringMap(val)
				for _, q := range p {
					ps = append(ps, problem{at + ".env" + q.sub, q.msg})
				}
				if p == nil {
					a.Env = x.(map[string]string)
				}
			case "unsigned_registration":
				if b, ok := val.(bool); ok {
					a.UnsignedRegistration = b
				} else {
					ps = append(ps, problem{at + ".unsigned_registration", "expected true or false, got " + jsonType(val)})
				}
			case "limits":
				l, p := jsonLimits(val)
				for _, q := range p {
					ps = append(ps, problem{at + ".limits" + q.sub, q.msg})
				}
				a.Limits = l
			default:
				ps = append(ps, problem{at + "." + k, unknownMsg(k, agentKeys)})
			}
		}
		out = append(out, a)
	}
	if ps != nil {
		return nil, ps
	}
	return out, nil
}

func jsonLimits(v any) (Limits, []problem) {
	var l Limits
	obj, ok := v.(map[string]any)
	if !ok {
		return l, probs("expected an object with memory_max, memory_high, cpu_max, pids_max, got " + jsonType(v))
	}
	var ps []problem
	for _, k := range sortedKeys(obj) {
		val := obj[k]
		var x any
		var p []problem
		switch k {
		case "memory_max", "memory_high":
			x, p = decodeJSON(&keySpec{kind: kSize}, val)
		case "cpu_max":
			x, p = decodeJSON(&keySpec{kind: kFloat}, val)
		case "pids_max":
			x, p = jsonInt(val)
		default:
			ps = append(ps, problem{"." + k, unknownMsg(k, limitsKeys)})
			continue
		}
		for _, q := range p {
			ps = append(ps, problem{"." + k + q.sub, q.msg})
		}
		if p == nil {
			setLimit(&l, k, x)
		}
	}
	return l, ps
}

func setLimit(l *Limits, k string, x any) {
	switch k {
	case "memory_max":
		l.MemoryMax = x.(int64)
	case "memory_high":
		l.MemoryHigh = x.(int64)
	case "cpu_max":
		l.CPUMax = x.(float64)
	case "pids_max":
		l.PidsMax = x.(int64)
	}
}

// decodeText converts a value given as text (an environment variable, or the values
// of a flag in order) to the key's typed value. Only lists and maps use more than the
// last value.
func decodeText(s *keySpec, vals []string) (any, []problem) {
	if len(vals) == 0 {
		return nil, probs("no value")
	}
	last := vals[len(vals)-1]
	switch s.kind {
	case kString:
		return last, nil
	case kBool:
		b, err := strconv.ParseBool(strings.TrimSpace(last))
		if err != nil {
			return nil, probs(fmt.Sprintf("expected true or false, got %q", last))
		}
		return b, nil
	case kInt:
		n, err := strconv.ParseInt(strings.TrimSpace(last), 10, 64)
		if err != nil {
			return nil, probs(fmt.Sprintf("expected a whole number, got %q", last))
		}
		return n, nil
	case kFloat:
		f, err := strconv.ParseFloat(strings.TrimSpace(last), 64)
		if err != nil {
			return nil, probs(fmt.Sprintf("expected a number, got %q", last))
		}
		return f, nil
	case kDuration:
		return parseDuration(last)
	case kSize:
		return parseSize(last)
	case kList:
		var out []string
		for _, v := range vals {
			out = append(out, splitList(v)...)
		}
		return out, nil
	case kMap:
		if len(vals) == 1 && strings.HasPrefix(strings.TrimSpace(last), "{") {
			var raw any
			if err := json.Unmarshal([]byte(last), &raw); err != nil {
				return nil, probs("invalid JSON object: " + err.Error())
			}
			return jsonStringMap(raw)
		}
		out := map[string]string{}
		var ps []problem
		for _, v := range vals {
			// Upstream's map syntax is k=v;k2=v2; ours also takes commas.
			for _, kv := range splitList(strings.ReplaceAll(v, ";", ",")) {
				k, val, ok := strings.Cut(kv, "=")
				if !ok || strings.TrimSpace(k) == "" {
					ps = append(ps, problem{msg: fmt.Sprintf("expected key=value, got %q", kv)})
					continue
				}
				out[strings.TrimSpace(k)] = val
			}
		}
		if ps != nil {
			return nil, ps
		}
		return out, nil
	case kAgents:
		var raw any
		if err := json.Unmarshal([]byte(last), &raw); err != nil {
			return nil, probs("expected a JSON array of agents: " + err.Error())
		}
		return jsonAgents(raw)
	case kRemoteNexlets:
		var raw any
		if err := json.Unmarshal([]byte(last), &raw); err != nil {
			return nil, probs("expected a JSON array of {\"name\", \"type\", \"public_key\"} objects: " + err.Error())
		}
		return jsonRemoteNexlets(raw)
	}
	return nil, probs("unsupported setting type")
}

func parseDuration(s string) (any, []problem) {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return nil, probs(fmt.Sprintf("invalid duration %q: expected a Go duration such as \"5s\" or \"1m30s\"", s))
	}
	return d, nil
}

// parseSize reads a byte count with an optional binary suffix (K, M, G, T, as
// systemd's MemoryMax= reads them); "", "max" and "infinity" mean no limit (0).
func parseSize(s string) (any, []problem) {
	t := strings.TrimSpace(s)
	switch strings.ToLower(t) {
	case "", "max", "infinity":
		return int64(0), nil
	}
	bad := probs(fmt.Sprintf("invalid size %q: expected bytes, a number with K, M, G or T, or \"max\"", s))
	num := strings.TrimRight(t, "KMGTkmgtiIbB")
	suffix := strings.ToUpper(t[len(num):])
	suffix = strings.TrimSuffix(strings.TrimSuffix(suffix, "B"), "I")
	mult := map[string]float64{"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
	m, ok := mult[suffix]
	if !ok || num == "" {
		return nil, bad
	}
	f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return nil, bad
	}
	total := f * m
	if total > math.MaxInt64/2 {
		return nil, probs(fmt.Sprintf("size %q is too large", s))
	}
	return int64(total), nil
}

// formatSize is the inverse of parseSize for display: the largest exact suffix.
func formatSize(n int64) string {
	if n == 0 {
		return "max"
	}
	for _, u := range []struct {
		s string
		m int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		if n%u.m == 0 {
			return strconv.FormatInt(n/u.m, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// unknownMsg is the message for an unknown key, with the nearest known key when one
// is close enough to be a likely typo.
func unknownMsg(k string, known []string) string {
	if s := nearest(k, known); s != "" {
		return fmt.Sprintf("unknown key %q (did you mean %q?)", k, s)
	}
	return fmt.Sprintf("unknown key %q", k)
}

// nearest returns the candidate with the smallest edit distance to k, if that
// distance is small for k's length.
func nearest(k string, candidates []string) string {
	// A group member given without its group ("servers" for "nats.servers").
	for _, c := range candidates {
		if strings.HasSuffix(c, "."+k) {
			return c
		}
	}
	best, bestD := "", math.MaxInt
	for _, c := range candidates {
		if d := editDistance(strings.ToLower(k), strings.ToLower(c)); d < bestD {
			best, bestD = c, d
		}
	}
	limit := max(2, len(k)/3)
	if bestD > limit {
		return ""
	}
	return best
}

// editDistance is the Damerau (optimal string alignment) distance, so a swap of two
// neighbouring letters counts as one edit.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	d := make([][]int, len(ra)+1)
	for i := range d {
		d[i] = make([]int, len(rb)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(ra); i++ {
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(ra)][len(rb)]
}
