package natsurl

import "testing"

func TestStripAndRedact(t *testing.T) {
	for _, c := range []struct{ in, strip, redact string }{
		{"nats://admin:s3cret@127.0.0.1:4222", "nats://127.0.0.1:4222", "nats://admin:[redacted]@127.0.0.1:4222"},
		{"nats://tok3n@host:4222", "nats://host:4222", "nats://[redacted]@host:4222"},
		{"tls://host:4443", "tls://host:4443", "tls://host:4443"},
		{"nats://a:b%zz@host", "nats://host", Redacted},
	} {
		if got := Strip(c.in); got != c.strip {
			t.Errorf("Strip(%q) = %q, want %q", c.in, got, c.strip)
		}
		if got := Redact(c.in); got != c.redact {
			t.Errorf("Redact(%q) = %q, want %q", c.in, got, c.redact)
		}
	}
}
