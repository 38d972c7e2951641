package daemon

import (
	"fmt"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// The start-up race (a directory removed under the create) is retried; a store that
// cannot be written (permissions) is not.
func TestStoreDirRaceRetryable(t *testing.T) {
	race := &jetstream.APIError{Code: 500, ErrorCode: 10077,
		Description: "could not create storage directory - mkdir /s/jetstream/A/streams: no such file or directory"}
	denied := &jetstream.APIError{Code: 500, ErrorCode: 10077,
		Description: "could not create storage directory - mkdir /s/jetstream/A/streams: permission denied"}
	if !retryableJS(fmt.Errorf("state: open KV bucket: %w", race)) {
		t.Error("the storage directory race is not retried")
	}
	if retryableJS(fmt.Errorf("state: open KV bucket: %w", denied)) {
		t.Error("a permission error is retried")
	}
}
