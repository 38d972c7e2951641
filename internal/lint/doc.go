// Package lint holds checks of the source tree that the compiler, go vet and
// staticcheck do not make: today that every log record names its error "err" (the
// journal field ERR), so one query finds every failure. They run as tests, in
// `make lint` and `make test`.
package lint
