// Command talker is a fleet-test workload that talks to another over NATS with the
// credentials the native nexlet hands it. "talker serve SUBJECT" answers requests;
// "talker ping SUBJECT FILE" asks every 100ms (500ms timeout) and keeps "OK FAILED"
// in FILE, so the test can count from outside whether the two kept talking.
package main

import (
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: talker serve SUBJECT | talker ping SUBJECT FILE")
		os.Exit(2)
	}
	nc, err := nats.Connect(os.Getenv("NEX_WORKLOAD_NATS_SERVERS"),
		nats.UserCredentials(os.Getenv("NEX_WORKLOAD_NATS_CREDS_FILE")),
		nats.CustomInboxPrefix(os.Getenv("NEX_WORKLOAD_NATS_INBOX_PREFIX")),
		nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	subject := os.Args[2]
	switch os.Args[1] {
	case "serve":
		if _, err := nc.Subscribe(subject, func(m *nats.Msg) { _ = m.Respond([]byte("pong")) }); err != nil {
			fmt.Fprintln(os.Stderr, "subscribe:", err)
			os.Exit(1)
		}
		select {}
	case "ping":
		if len(os.Args) < 4 {
			os.Exit(2)
		}
		var ok, failed int
		for {
			if _, err := nc.Request(subject, []byte("ping"), 500*time.Millisecond); err == nil {
				ok++
			} else {
				failed++
			}
			_ = os.WriteFile(os.Args[3]+".tmp", fmt.Appendf(nil, "%d %d\n", ok, failed), 0o644)
			_ = os.Rename(os.Args[3]+".tmp", os.Args[3])
			time.Sleep(100 * time.Millisecond)
		}
	}
}
