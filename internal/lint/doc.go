// Package lint holds checks of the source tree that the compiler, go vet and
// staticcheck do not make: that every log record names its error "err" (the journal
// field ERR), so one query finds every failure, and that `make fuzz` runs every fuzz
// target. They run as tests, in `make lint` and `make test`.
package lint
