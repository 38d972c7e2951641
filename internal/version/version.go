// Package version carries the build's version, commit and date, set with -ldflags -X.
package version

// These are set at build time by the Makefile (-X); they are variables only for that.
var (
	Version   = "dev"
	Commit    = "unknown"
	BuildDate = "unknown"
)

// String is the one-line form printed by --version.
func String(prog string) string {
	return prog + " " + Version + " (commit " + Commit + ", built " + BuildDate + ")"
}
