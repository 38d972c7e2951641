package node

import (
	"encoding/json"
	"log/slog"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// Emitter publishes lifecycle events (--events). from is the node id for node and
// agent events; typ is one of the protocol.Event* names.
type Emitter interface {
	Emit(from, typ string, event any)
}

// NoEmitter drops every event (--events "").
type NoEmitter struct{}

// Emit implements Emitter.
func (NoEmitter) Emit(string, string, any) {}

// NATSEmitter publishes events as JSON on $NEX.FEED.<from>.events.<TYPE> (--events nats).
type NATSEmitter struct {
	NC     *nats.Conn
	Logger *slog.Logger
}

// Emit implements Emitter. A failed publish is logged, never returned: events are
// best effort and must not fail the operation that caused them.
func (e NATSEmitter) Emit(from, typ string, event any) {
	b, err := json.Marshal(event)
	if err == nil {
		err = e.NC.Publish(protocol.EventSubject(from, typ), b)
	}
	if err != nil && e.Logger != nil {
		e.Logger.Warn("failed to publish event", "type", typ, "from", from, "err", err)
	}
}

// LogEmitter logs events at INFO (--events logs).
type LogEmitter struct {
	Logger *slog.Logger
}

// Emit implements Emitter.
func (e LogEmitter) Emit(from, typ string, event any) {
	if e.Logger != nil {
		e.Logger.Info("event emitted", "type", typ, "from", from, "event", event)
	}
}
