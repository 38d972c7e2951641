package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
)

// MaxMessageBytes bounds what Decode accepts; NATS's default max payload is 1 MiB.
const MaxMessageBytes = 8 << 20

// DecodeError says which message and field was wrong.
type DecodeError struct {
	Type  string // Go type name of the message
	Field string // JSON field, when known
	Err   error
}

func (e *DecodeError) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("invalid %s: field %q: %v", e.Type, e.Field, e.Err)
	}
	return fmt.Sprintf("invalid %s: %v", e.Type, e.Err)
}

func (e *DecodeError) Unwrap() error { return e.Err }

// ErrMissing marks a required key that is absent.
var ErrMissing = errors.New("required field is missing")

// requiredKeys lists, per message type, the keys upstream's decoders insist on.
func requiredKeys(v any) []string {
	switch v.(type) {
	case *NodePingRequest:
		return []string{"filter"}
	case *NodePingResponse:
		return []string{"agent_count", "node_id", "start_time", "state", "tags", "version", "xkey"}
	case *NodeInfoResponse:
		return []string{"node_id", "tags", "uptime", "version", "xkey"}
	case *LameduckRequest:
		return []string{"delay"}
	case *LameduckResponse:
		return []string{"message", "success"}
	case *AuctionRequest:
		return []string{"agent_type", "auction_id", "tags"}
	case *AuctionResponse:
		return []string{"bidder_id", "start_request_schema", "supported_lifecycles", "xkey"}
	case *StartWorkloadRequest:
		return []string{"description", "name", "namespace", "run_request", "tags", "workload_lifecycle", "workload_type"}
	case *StartWorkloadResponse:
		return []string{"id", "name"}
	case *AgentStartWorkloadRequest:
		return []string{"request", "workload_creds"}
	case *StopWorkloadRequest:
		return []string{"namespace"}
	case *StopWorkloadResponse:
		return []string{"id", "message", "stopped", "workload_type"}
	case *CloneWorkloadRequest:
		return []string{"namespace", "new_target_xkey"}
	case *AgentListWorkloadsRequest:
		return []string{"filter", "namespace"}
	case *WorkloadSummary:
		return []string{"id", "name", "runtime", "start_time", "tags", "workload_lifecycle", "workload_state", "workload_type"}
	case *RegisterAgentRequest:
		return []string{"description", "max_workloads", "name", "public_xkey", "register_type", "start_request_schema", "version"}
	case *RegisterAgentResponse:
		return []string{"connection_data", "existing_state", "message", "node_id", "success"}
	case *RegisterRemoteAgentResponse:
		return []string{"assigned_agent_id", "respond_to"}
	case *AgentHeartbeat:
		return []string{"data", "summary"}
	case *NatsConnectionData:
		return []string{"conn_name", "nats_servers", "nats_user_jwt", "nats_user_name", "nats_user_nkey",
			"nats_user_password", "nats_user_seed", "tls_ca", "tls_cert", "tls_first", "tls_key"}
	}
	return nil
}

// Decode unmarshals a wire message into v (a pointer to one of this package's types),
// rejecting missing required keys, wrong types and oversized input with an error
// that names the message and the field.
func Decode(data []byte, v any) error {
	name := typeName(v)
	if len(data) > MaxMessageBytes {
		return &DecodeError{Type: name, Err: fmt.Errorf("message of %d bytes exceeds %d", len(data), MaxMessageBytes)}
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return &DecodeError{Type: name, Err: errors.New("empty message")}
	}
	if keys := requiredKeys(v); len(keys) > 0 {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(data, &obj); err != nil {
			return &DecodeError{Type: name, Err: jsonErr(err)}
		}
		if obj == nil {
			return &DecodeError{Type: name, Err: errors.New("expected a JSON object, got null")}
		}
		for _, k := range keys {
			if _, ok := obj[k]; !ok {
				return &DecodeError{Type: name, Field: k, Err: ErrMissing}
			}
		}
	}
	if err := json.Unmarshal(data, v); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return &DecodeError{Type: name, Field: ute.Field, Err: fmt.Errorf("expected %s, got JSON %s", ute.Type, ute.Value)}
		}
		return &DecodeError{Type: name, Err: jsonErr(err)}
	}
	return validateEnums(v, name)
}

func validateEnums(v any, name string) error {
	switch m := v.(type) {
	case *StartWorkloadRequest:
		if !m.WorkloadLifecycle.Valid() {
			return &DecodeError{Type: name, Field: "workload_lifecycle",
				Err: fmt.Errorf("%q is not one of service, job, function", m.WorkloadLifecycle)}
		}
	case *AgentStartWorkloadRequest:
		return validateEnums(&m.Request, typeName(&m.Request))
	case *RegisterAgentRequest:
		for _, l := range m.SupportedLifecycles {
			if !l.Valid() {
				return &DecodeError{Type: name, Field: "supported_lifecycles",
					Err: fmt.Errorf("%q is not one of service, job, function", l)}
			}
		}
	}
	return nil
}

func jsonErr(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("malformed JSON at byte %d: %w", se.Offset, err)
	}
	return err
}

func typeName(v any) string {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil {
		return "message"
	}
	return strings.TrimPrefix(t.Name(), "protocol.")
}
