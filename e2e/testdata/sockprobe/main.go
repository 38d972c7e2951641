// Command sockprobe plays a process that poses as the native nexlet on nexd's socket
// for adopted nexlets (e2e TestAttackAdoptedNexletSocket): it connects, says it serves
// start requests, sends a feed batch with one forged log line on the subject given,
// registers unsigned under the agent id given, and takes what comes for a while. It
// prints one JSON line saying what it got.
//
//	sockprobe <socket> <feed subject> <register subject> <wait>
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

type result struct {
	DialErr     string `json:"dial_err,omitempty"`
	RegisterErr string `json:"register_err,omitempty"`
	Registered  bool   `json:"registered"`
	Requests    int    `json:"requests"`
	Closed      bool   `json:"closed"` // the node closed the connection
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: sockprobe <socket> <feed subject> <register subject> <wait>")
		os.Exit(2)
	}
	wait, err := time.ParseDuration(os.Args[4])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var res result
	defer func() { _ = json.NewEncoder(os.Stdout).Encode(res) }()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	f, _, err := localchan.Dial(ctx, os.Args[1])
	if err != nil {
		res.DialErr = err.Error()
		return
	}
	s, err := localchan.NewServer(f)
	if err != nil {
		res.DialErr = err.Error()
		return
	}
	defer s.Close()
	_ = s.Announce()
	forged := &nats.Msg{Subject: os.Args[2], Header: nats.Header{}, Data: []byte("forged by sockprobe")}
	_ = s.SendFeeds(1, []*nats.Msg{forged})
	msg, err := s.Call(ctx, os.Args[3], nil, []byte(`{"name":"go_exec","register_type":"native"}`))
	switch {
	case err != nil:
		res.RegisterErr = err.Error()
		res.Closed = !errors.Is(err, context.DeadlineExceeded)
		return
	case msg.Header.Get(protocol.HeaderErrorCode) != "":
		res.RegisterErr = msg.Header.Get(protocol.HeaderErrorCode) + " " + msg.Header.Get(protocol.HeaderError)
	default:
		res.Registered = true
	}
	stop := time.AfterFunc(time.Until(deadline(ctx)), func() { _ = s.StopServing() })
	defer stop.Stop()
	serr := s.Serve(func(*localchan.Request) { res.Requests++ })
	res.Closed = serr != nil || ctx.Err() == nil
}

func deadline(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}
