package control

import (
	"encoding/json"
	"reflect"
	"slices"
	"sort"
	"testing"
	"time"
)

// fill sets every field of v, recursively, to a non-zero value.
func fill(v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		v.SetString("x")
	case reflect.Int, reflect.Int64:
		if v.Type() == reflect.TypeFor[Duration]() || v.Type() == reflect.TypeFor[time.Duration]() {
			v.SetInt(int64(time.Second))
			return
		}
		v.SetInt(7)
	case reflect.Uint64, reflect.Uint32, reflect.Uint:
		v.SetUint(7)
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem())
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		fill(v.Index(0))
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(k)
		fill(e)
		m.SetMapIndex(k, e)
		v.Set(m)
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			v.Set(reflect.ValueOf(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)))
			return
		}
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i))
			}
		}
	}
}

// paths lists the JSON paths of every leaf in v that is not a zero value (arrays as
// []).
func paths(prefix string, v any, out *[]string) {
	switch x := v.(type) {
	case map[string]any:
		if len(x) == 0 {
			*out = append(*out, prefix)
		}
		for k, e := range x {
			p := k
			if prefix != "" {
				p = prefix + "." + k
			}
			if prefix == "workloads" || prefix == "auctions_not_bid" {
				p = prefix + ".*"
			}
			paths(p, e, out)
		}
	case []any:
		for _, e := range x {
			paths(prefix+"[]", e, out)
		}
	default:
		switch v {
		case "", 0.0, false, "0s", "0001-01-01T00:00:00Z", nil:
			// A zero value tells nothing (fields without omitempty).
		default:
			*out = append(*out, prefix)
		}
	}
}

// TestPublicViewAllowList: of a Status with every field set, the public view keeps
// exactly these (counts and the node's health). A field added to Status stays out of
// it, and this list says so, until someone decides it is for any local user.
func TestPublicViewAllowList(t *testing.T) {
	var st Status
	fill(reflect.ValueOf(&st).Elem())
	st.Public = false
	b, err := json.Marshal(st.PublicView())
	if err != nil {
		t.Fatal(err)
	}
	var raw any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	var got []string
	paths("", raw, &got)
	sort.Strings(got)
	want := []string{
		"auctions_not_bid.*",
		"cgroup.driver", "cgroup.enforced[]", "cgroup.mode",
		"commit", "detail", "lameduck_until",
		"last_drain.at", "last_drain.state",
		"local_state.checked", "local_state.since", "local_state.state",
		"name",
		"nats.connected", "nats.embedded",
		"nats.jetstream.checked", "nats.jetstream.current", "nats.jetstream.replicas", "nats.jetstream.since", "nats.jetstream.state",
		"nats.leaf.connected", "nats.leaf.remotes",
		"nats.reconnects", "nats.rtt", "nats.server",
		"nexlet_drops.list_answers_refused", "nexlet_drops.reregistrations", "nexlet_drops.user_renewals", "nexlet_drops.workload_renewals",
		"nexlets[].health", "nexlets[].name", "nexlets[].restarts", "nexlets[].state", "nexlets[].type",
		"nexus", "node_id", "public", "start_time", "state", "tombstone_count", "uptime", "version",
		"workloads.*", "workloads_as_of",
	}
	if !slices.Equal(got, want) {
		t.Errorf("the public view has\n%q\nwant\n%q", got, want)
	}
	if pv := st.PublicView(); pv.TombstoneCount != 7 || pv.Tombstones != nil {
		t.Errorf("public tombstones: count %d, list %v; want the count only", pv.TombstoneCount, pv.Tombstones)
	}
}
