package native

import (
	"log/slog"
	"os"
	"strings"
	"testing"
)

// TestCgroupDriverRefused: a nexlet told to use systemd scopes where systemd is not the
// init system refuses to start with the reason (it never falls back silently: the
// operator asked for scopes); an unknown driver names the choices.
func TestCgroupDriverRefused(t *testing.T) {
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		t.Skip("systemd is the init system here; make systemd-test covers the driver")
	}
	for driver, want := range map[string]string{
		DriverSystemd: "systemd is not the init system here",
		"runc":        `want cgroupfs or systemd`,
	} {
		_, err := New(Config{RuntimeDir: t.TempDir(), CgroupDriver: driver, Users: UserPolicy{LeaseDir: t.TempDir()},
			Logger: slog.New(slog.DiscardHandler)})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("driver %q: %v, want an error with %q", driver, err, want)
		}
	}
}
