//go:build cgo && !osusergo

package native

// nssLookups: in a build with cgo, os/user asks the system's user database (NSS: LDAP,
// sssd, systemd's own users), which may know ids the files do not.
const nssLookups = true
