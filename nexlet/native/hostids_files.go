//go:build !cgo || osusergo

package native

// nssLookups: without cgo, os/user reads /etc/passwd and /etc/group only, which hostIDs
// already did.
const nssLookups = false
