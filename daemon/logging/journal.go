package logging

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/journal"
)

// Journal fields nexd sets itself; an attr mapping to one of these gets an ATTR_
// prefix instead of shadowing it.
const (
	fieldNodeID     = "NEX_NODE_ID"
	fieldNamespace  = "NEX_NAMESPACE"
	fieldNexlet     = "NEX_NEXLET"
	fieldWorkloadID = "NEX_WORKLOAD_ID"
)

// reservedField reports the journal fields nexd sets itself. A switch, like wellKnown, not
// a package-level map: a map is built by the package's init, which runs in the native
// nexlet too and maps that part of the binary there (docs/performance-notes.md, Memory).
func reservedField(name string) bool {
	switch name {
	case "MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID", "CODE_FILE", "CODE_LINE", "CODE_FUNC",
		fieldNodeID, fieldNamespace, fieldNexlet, fieldWorkloadID:
		return true
	}
	return false
}

// wellKnown turns attrs with these keys into the well-known nexd journal fields, so
// `journalctl NEX_WORKLOAD_ID=...` finds everything about one workload.
func wellKnown(key string) (string, bool) {
	switch key {
	case "nexlet":
		return fieldNexlet, true
	case "workload_id":
		return fieldWorkloadID, true
	case "namespace":
		return fieldNamespace, true
	}
	return "", false
}

// journalReachable tells a missing or dead journald apart before the journal
// target is chosen (journal.Send would only fail later, record by record).
func journalReachable() error {
	c, err := net.Dial("unixgram", JournalSocket)
	if err != nil {
		return fmt.Errorf("logging: journal target: connect to journald socket %s: %w", JournalSocket, err)
	}
	return c.Close()
}

type field struct{ name, value string }

// journalHandler turns records into journal entries with structured fields and
// sends them with go-systemd's journal.Send (which passes large entries as a file).
type journalHandler struct {
	base   []field // SYSLOG_IDENTIFIER, NEX_NODE_ID, NEX_NAMESPACE, SYSLOG_PID
	fields []field // from WithAttrs, already named
	prefix string  // open groups, as "GROUP_"
}

func newJournalHandler(nodeID, namespace string, withPID bool) *journalHandler {
	base := []field{{"SYSLOG_IDENTIFIER", "nexd"}}
	if nodeID != "" {
		base = append(base, field{fieldNodeID, nodeID})
	}
	if namespace != "" {
		base = append(base, field{fieldNamespace, namespace})
	}
	if withPID {
		base = append(base, field{"SYSLOG_PID", strconv.Itoa(os.Getpid())})
	}
	return &journalHandler{base: base}
}

func (h *journalHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	n := *h
	n.fields = slices.Clip(h.fields)
	for _, a := range attrs {
		n.fields = appendFields(n.fields, h.prefix, a)
	}
	return &n
}

func (h *journalHandler) WithGroup(name string) slog.Handler {
	n := *h
	n.prefix = h.prefix + name + "_"
	return &n
}

func (h *journalHandler) Handle(_ context.Context, r slog.Record) error {
	fields := make([]field, 0, len(h.base)+len(h.fields)+r.NumAttrs()+3)
	fields = append(fields, h.base...)
	if r.PC != 0 {
		fr, _ := runtime.CallersFrames([]uintptr{r.PC}).Next()
		if fr.File != "" {
			fields = append(fields, field{"CODE_FILE", fr.File}, field{"CODE_LINE", strconv.Itoa(fr.Line)}, field{"CODE_FUNC", fr.Function})
		}
	}
	fields = append(fields, h.fields...)
	r.Attrs(func(a slog.Attr) bool {
		fields = appendFields(fields, h.prefix, a)
		return true
	})
	if err := journal.Send(r.Message, journal.Priority(Priority(r.Level)), fieldMap(fields)); err != nil {
		return fmt.Errorf("logging: send to journald socket %s: %w", JournalSocket, err)
	}
	return nil
}

// fieldMap keeps the last value of each field, so a record's namespace replaces
// the node's and an attr repeated by With replaces the earlier one.
func fieldMap(fields []field) map[string]string {
	m := make(map[string]string, len(fields))
	for _, f := range fields {
		m[f.name] = f.value
	}
	return m
}

func appendFields(fields []field, prefix string, a slog.Attr) []field {
	a.Value = a.Value.Resolve()
	if a.Value.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "_"
		}
		for _, ga := range a.Value.Group() {
			fields = appendFields(fields, p, ga)
		}
		return fields
	}
	if a.Key == "" {
		return fields
	}
	if f, ok := wellKnown(a.Key); ok {
		return append(fields, field{f, a.Value.String()})
	}
	return append(fields, field{FieldName(prefix + a.Key), a.Value.String()})
}

// FieldName maps an attr key to a journal field name: upper case, [A-Z0-9_] only,
// not starting with '_' (trusted fields) or a digit, at most 64 characters, and
// not one of the fields nexd sets itself.
func FieldName(key string) string {
	var b strings.Builder
	for _, r := range strings.ToUpper(key) {
		switch {
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	name := strings.TrimLeft(b.String(), "_")
	if name == "" || (name[0] >= '0' && name[0] <= '9') || reservedField(name) {
		name = "ATTR_" + name
	}
	if len(name) > 64 {
		name = name[:64]
	}
	return name
}

// Priority maps an slog level to a syslog priority.
func Priority(l slog.Level) int {
	switch {
	case l >= slog.LevelError+4:
		return 2 // crit
	case l >= slog.LevelError:
		return 3 // err
	case l >= slog.LevelWarn:
		return 4 // warning
	case l >= slog.LevelInfo:
		return 6 // info
	default:
		return 7 // debug
	}
}
