package daemon

import (
	"testing"

	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/profdump"
)

// TestEarlyNexletKnowsNexdsVariables: the package that execs the native nexlet at
// nexd's init cannot import daemon or profdump (it would be initialised after them), so
// it names their environment variables itself; they must be the same.
func TestEarlyNexletKnowsNexdsVariables(t *testing.T) {
	if got := earlynexlet.ReexecEnv(); got != [2]string{envHandover, envDirLocks} {
		t.Errorf("earlynexlet.ReexecEnv() = %q, want %q and %q", got, envHandover, envDirLocks)
	}
	env := map[string]string{profdump.EnvDir: "/tmp/p", "GODEBUG": "x=1"}
	if got := earlynexlet.RuntimeEnv(func(k string) string { return env[k] }); got["GODEBUG"] != profdump.PassOn(func(k string) string { return env[k] })["GODEBUG"] {
		t.Errorf("earlynexlet.RuntimeEnv passes %v on; profdump.PassOn %v", got, profdump.PassOn(func(k string) string { return env[k] }))
	}
}
