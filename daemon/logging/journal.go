package logging

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Journal fields nexd sets itself; an attr mapping to one of these gets an ATTR_
// prefix instead of shadowing it.
const (
	fieldNodeID     = "NEX_NODE_ID"
	fieldNamespace  = "NEX_NAMESPACE"
	fieldNexlet     = "NEX_NEXLET"
	fieldWorkloadID = "NEX_WORKLOAD_ID"
)

var reservedFields = map[string]bool{
	"MESSAGE": true, "PRIORITY": true, "SYSLOG_IDENTIFIER": true, "SYSLOG_PID": true,
	"CODE_FILE": true, "CODE_LINE": true, "CODE_FUNC": true,
	fieldNodeID: true, fieldNamespace: true, fieldNexlet: true, fieldWorkloadID: true,
}

// Attrs with these keys become the well-known nexd journal fields, so
// `journalctl NEX_WORKLOAD_ID=...` finds everything about one workload.
var wellKnown = map[string]string{
	"nexlet":      fieldNexlet,
	"workload_id": fieldWorkloadID,
	"namespace":   fieldNamespace,
}

// journalWriter sends native-protocol datagrams to journald.
type journalWriter struct {
	path string
	conn *net.UnixConn
}

func dialJournal(path string) (*journalWriter, error) {
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("logging: journal target: connect to journald socket %s: %w", path, err)
	}
	return &journalWriter{path: path, conn: c}, nil
}

func (w *journalWriter) Close() error { return w.conn.Close() }

// send writes one entry. Entries too big for a datagram go, as journald expects,
// through a sealed memfd passed with SCM_RIGHTS.
func (w *journalWriter) send(b []byte) error {
	_, err := w.conn.Write(b)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.EMSGSIZE) && !errors.Is(err, syscall.ENOBUFS) {
		return fmt.Errorf("logging: write to journald socket %s: %w", w.path, err)
	}
	fd, err := unix.MemfdCreate("nexd-journal", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("logging: large journal entry: memfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "nexd-journal")
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		return fmt.Errorf("logging: large journal entry: write memfd: %w", err)
	}
	seals := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE | unix.F_SEAL_SEAL
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		return fmt.Errorf("logging: large journal entry: seal memfd: %w", err)
	}
	// Sendmsg on the raw fd: net refuses an empty-payload write with only
	// control data on a connected datagram socket.
	raw, err := w.conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("logging: large journal entry: %w", err)
	}
	var sendErr error
	if err := raw.Write(func(s uintptr) bool {
		sendErr = unix.Sendmsg(int(s), nil, unix.UnixRights(fd), nil, 0)
		return sendErr != unix.EAGAIN
	}); err != nil {
		return fmt.Errorf("logging: large journal entry: pass memfd to %s: %w", w.path, err)
	}
	if sendErr != nil {
		return fmt.Errorf("logging: large journal entry: pass memfd to %s: %w", w.path, sendErr)
	}
	return nil
}

type field struct{ name, value string }

// journalHandler turns records into journal entries with structured fields.
type journalHandler struct {
	w      *journalWriter
	base   []field // SYSLOG_IDENTIFIER, NEX_NODE_ID, NEX_NAMESPACE, SYSLOG_PID
	fields []field // from WithAttrs, already named
	prefix string  // open groups, as "GROUP_"
}

func newJournalHandler(path, nodeID, namespace string, withPID bool) (*journalHandler, error) {
	w, err := dialJournal(path)
	if err != nil {
		return nil, err
	}
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
	return &journalHandler{w: w, base: base}, nil
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
	fields := make([]field, 0, len(h.base)+len(h.fields)+r.NumAttrs()+5)
	fields = append(fields, field{"MESSAGE", r.Message}, field{"PRIORITY", strconv.Itoa(Priority(r.Level))})
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
	return h.w.send(encodeJournal(dedupe(fields)))
}

// dedupe keeps the last value of each well-known nexd field, so a record's
// namespace replaces the node's; other fields may repeat, as journald allows.
func dedupe(fields []field) []field {
	last := map[string]int{}
	for i, f := range fields {
		if strings.HasPrefix(f.name, "NEX_") {
			last[f.name] = i
		}
	}
	out := fields[:0:0]
	for i, f := range fields {
		if j, ok := last[f.name]; ok && j != i {
			continue
		}
		out = append(out, f)
	}
	return out
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
	if f, ok := wellKnown[a.Key]; ok {
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
	if name == "" || (name[0] >= '0' && name[0] <= '9') || reservedFields[name] {
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

// encodeJournal writes the native protocol: NAME=value lines, or for values with
// a newline NAME, a little-endian 64-bit length and the raw value.
func encodeJournal(fields []field) []byte {
	var b bytes.Buffer
	for _, f := range fields {
		if strings.ContainsRune(f.value, '\n') {
			b.WriteString(f.name)
			b.WriteByte('\n')
			binary.Write(&b, binary.LittleEndian, uint64(len(f.value)))
			b.WriteString(f.value)
			b.WriteByte('\n')
			continue
		}
		b.WriteString(f.name)
		b.WriteByte('=')
		b.WriteString(f.value)
		b.WriteByte('\n')
	}
	return b.Bytes()
}
