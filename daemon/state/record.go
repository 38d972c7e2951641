package state

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/nexd-project/nexd/protocol"
)

// MaxWorkloadIDLen bounds the id part of a record's key. nexd's ids, like upstream's
// nuids, are 22 characters; the bound only keeps a hand-made key from carrying a
// value of any length into a nexlet's cgroup and file names.
const MaxWorkloadIDLen = 64

// MaxRecordNameLen bounds a record's namespace and workload name. A deploy's are
// bounded tighter (protocol.MaxNamespaceLen, protocol.MaxNameLen); records written
// before those bounds are replayed still.
const MaxRecordNameLen = 256

// RecordError is a record of node state that cannot be replayed: which key, which
// field of its value ("" for the key or the value as a whole) and why.
type RecordError struct {
	Bucket string
	Key    string
	Field  string
	Err    error
}

func (e *RecordError) Error() string {
	where := fmt.Sprintf("record %q", e.Key)
	if e.Bucket != "" {
		where += " of bucket " + e.Bucket
	}
	if e.Field != "" {
		return fmt.Sprintf("state: %s: field %q: %v", where, e.Field, e.Err)
	}
	return fmt.Sprintf("state: %s: %v", where, e.Err)
}

func (e *RecordError) Unwrap() error { return e.Err }

// DecodeRecord checks and decodes one record of node state, key <type>.<id> (StoredKey;
// an older nexd's <type>_<id>, Key) and value the JSON of a start request, as a deploy's request is checked when it comes
// over NATS (protocol.Decode: the keys upstream requires, the fields' JSON types, the
// lifecycle; then the namespace and the name, with the looser bounds of CheckRecord)
// and, beyond it, that the key is one Key
// makes (its id a plain token: it becomes a nexlet's cgroup, file and uid lease
// names) and agrees with the value's workload_type. maxBytes bounds the value (<= 0:
// protocol.MaxMessageBytes). A record is read back from a store that anyone with the
// bucket's JetStream rights can write, or that a disk fault can cut: before, its value
// was only unmarshalled, so a record without a namespace, or an id such as
// "x/../../system.slice", was handed to the nexlet at its registration.
func DecodeRecord(key string, value []byte, maxBytes int) (protocol.StartWorkloadRequest, error) {
	var req protocol.StartWorkloadRequest
	if err := checkKey(key); err != nil {
		return req, err
	}
	if maxBytes <= 0 {
		maxBytes = protocol.MaxMessageBytes
	}
	if len(value) > maxBytes {
		return req, &RecordError{Key: key, Err: fmt.Errorf("value of %d bytes exceeds %d", len(value), maxBytes)}
	}
	if err := protocol.Decode(value, &req); err != nil {
		var de *protocol.DecodeError
		if errors.As(err, &de) {
			return protocol.StartWorkloadRequest{}, &RecordError{Key: key, Field: de.Field, Err: de.Err}
		}
		return protocol.StartWorkloadRequest{}, &RecordError{Key: key, Err: err}
	}
	if err := CheckRecord(key, req); err != nil {
		return protocol.StartWorkloadRequest{}, err
	}
	return req, nil
}

// CheckRecord is DecodeRecord's check of a decoded record: the key is one StoredKey or
// Key makes, its type the request's, the namespace one subject token and the name data
// (no control characters), each of at most MaxRecordNameLen bytes. The node runs it
// again on whatever its Store returns before it hands a record to a nexlet, so no Store
// can pass it an unchecked one.
func CheckRecord(key string, req protocol.StartWorkloadRequest) error {
	if err := checkKey(key); err != nil {
		return err
	}
	typ, _, _ := SplitKey(key)
	bad := func(field string, err error) error { return &RecordError{Key: key, Field: field, Err: err} }
	if req.WorkloadType != typ {
		return bad("workload_type", fmt.Errorf("%q is not the key's workload type %q", req.WorkloadType, typ))
	}
	if !req.WorkloadLifecycle.Valid() {
		return bad("workload_lifecycle", fmt.Errorf("%q is not one of service, job, function", req.WorkloadLifecycle))
	}
	// Looser than a deploy's bounds on length and letters, which came later: a
	// workload an older nexd (or upstream) placed in a 100-character namespace, or
	// named with a space, is replayed (daemon/node TestLongNamespaceWorkloadKeptAfterUpgrade).
	switch ns := req.Namespace; {
	case len(ns) > MaxRecordNameLen:
		return bad("namespace", fmt.Errorf("%d characters, more than %d", len(ns), MaxRecordNameLen))
	case !protocol.IsToken(ns):
		return bad("namespace", fmt.Errorf("%+q is not one subject token of letters, digits, - or _", ns))
	}
	switch name := req.Name; {
	case name == "":
		return bad("name", errors.New("empty"))
	case len(name) > MaxRecordNameLen:
		return bad("name", fmt.Errorf("%d characters, more than %d", len(name), MaxRecordNameLen))
	case !utf8.ValidString(name) || strings.ContainsFunc(name, unicode.IsControl):
		return bad("name", fmt.Errorf("%+q has control characters or is not UTF-8", name))
	}
	return nil
}

// checkKey checks that key is one StoredKey or Key makes.
func checkKey(key string) error {
	bad := func(err error) error { return &RecordError{Key: key, Err: err} }
	typ, id, ok := SplitKey(key)
	switch {
	case !ok:
		return bad(errors.New("the key is not <workload type>.<workload id> (nor an older nexd's <workload type>_<workload id>)"))
	case !protocol.IsToken(typ):
		return bad(fmt.Errorf("the key's workload type %q is not a plain token (letters, digits, - and _)", typ))
	case len(id) > MaxWorkloadIDLen:
		return bad(fmt.Errorf("the key's workload id is %d characters long, more than %d", len(id), MaxWorkloadIDLen))
	case !validWorkloadID().MatchString(id):
		return bad(fmt.Errorf("the key's workload id %q is not a plain token (letters, digits and - only)", id))
	}
	return nil
}
