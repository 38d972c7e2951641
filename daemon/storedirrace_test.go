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
	if retry, _ := retryableJS(fmt.Errorf("state: open KV bucket: %w", race)); !retry {
		t.Error("the storage directory race is not retried")
	}
	if retry, _ := retryableJS(fmt.Errorf("state: open KV bucket: %w", denied)); retry {
		t.Error("a permission error is retried")
	}
}
