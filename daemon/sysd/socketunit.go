package sysd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	sddbus "github.com/coreos/go-systemd/v22/dbus"
)

// StopOwnSocketUnits stops the socket units that start this process's service (its
// unit's TriggeredBy=, as nexd.socket starts nexd.service) and returns their names:
// after a lame duck drain the node must stay down, and a socket left listening starts
// its service for whoever connects to it (the control socket is 0666 for `nexctl
// status`). Only the sockets are stopped (job mode ignore-dependencies), not the
// service, which ends by itself; `systemctl start nexd` starts them again (Requires=).
// Without systemd as init, or outside a unit, it does nothing.
func StopOwnSocketUnits(ctx context.Context) ([]string, error) {
	if fi, err := os.Stat("/run/systemd/system"); err != nil || !fi.IsDir() {
		return nil, nil
	}
	var conn *sddbus.Conn
	var err error
	if os.Geteuid() == 0 {
		conn, err = sddbus.NewSystemdConnectionContext(ctx) // systemd's private socket: no bus daemon needed
	}
	if conn == nil {
		var err2 error
		if conn, err2 = sddbus.NewSystemConnectionContext(ctx); err2 != nil {
			return nil, fmt.Errorf("connect to systemd: %w", errors.Join(err, err2))
		}
	}
	defer conn.Close()
	unit, err := conn.GetUnitNameByPID(ctx, uint32(os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("own unit: %w", err)
	}
	if !strings.HasSuffix(unit, ".service") {
		return nil, nil
	}
	p, err := conn.GetUnitPropertyContext(ctx, unit, "TriggeredBy")
	if err != nil {
		return nil, fmt.Errorf("%s: TriggeredBy: %w", unit, err)
	}
	by, _ := p.Value.Value().([]string)
	var stopped []string
	var errs []error
	for _, name := range by {
		if !strings.HasSuffix(name, ".socket") {
			continue
		}
		done := make(chan string, 1)
		if _, err := conn.StopUnitContext(ctx, name, "ignore-dependencies", done); err != nil {
			errs = append(errs, fmt.Errorf("stop %s: %w", name, err))
			continue
		}
		select {
		case res := <-done:
			if res != "done" {
				errs = append(errs, fmt.Errorf("stop %s: job %s", name, res))
				continue
			}
			stopped = append(stopped, name)
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("stop %s: %w", name, ctx.Err()))
		}
	}
	return stopped, errors.Join(errs...)
}
