// Command credsclient is a test workload: a NATS client that connects the way the
// native nexlet documents (nats.UserCredentials on NEX_WORKLOAD_NATS_CREDS_FILE) and
// publishes a tick to <namespace>.tick every 200ms, with its reconnect count.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
)

func main() {
	nc, err := nats.Connect(os.Getenv("NEX_WORKLOAD_NATS_SERVERS"),
		nats.UserCredentials(os.Getenv("NEX_WORKLOAD_NATS_CREDS_FILE")),
		nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { fmt.Println("disconnected:", err) }),
		nats.ReconnectHandler(func(*nats.Conn) { fmt.Println("reconnected") }),
		nats.ClosedHandler(func(*nats.Conn) { fmt.Println("closed") }))
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	fmt.Println("connected")
	subject := os.Getenv("NEX_NAMESPACE") + ".tick"
	for i := 0; ; i++ {
		b, _ := json.Marshal(map[string]uint64{"n": uint64(i), "reconnects": nc.Stats().Reconnects})
		_ = nc.Publish(subject, b)
		time.Sleep(200 * time.Millisecond)
	}
}
