package natsurl

import "testing"

// TestStripAndRedact: the whole userinfo goes, however the URL is spelled. Before, a
// server URL without a scheme, which nats.go reads as nats:// ("admin:s3cret@host:4222"),
// parsed as the scheme "admin" with no userinfo and was shown and handed to children
// whole; one net/url could not parse was shown as [redacted] alone, naming no host.
func TestStripAndRedact(t *testing.T) {
	for _, c := range []struct{ in, strip, redact string }{
		{"nats://admin:s3cret@127.0.0.1:4222", "nats://127.0.0.1:4222", "nats://[redacted]@127.0.0.1:4222"},
		{"nats://tok3n@host:4222", "nats://host:4222", "nats://[redacted]@host:4222"},
		{"tls://host:4443", "tls://host:4443", "tls://host:4443"},
		{"nats://a:b%zz@host", "nats://host", "nats://[redacted]@host"},
		{"admin:s3cret@host:4222", "host:4222", "[redacted]@host:4222"},
		{"tok3n@host:4222", "host:4222", "[redacted]@host:4222"},
		{"nats://u:p@ss@host", "nats://host", "nats://[redacted]@host"},
		{"nats-leaf://u:p%zz@hub:7422", "nats-leaf://hub:7422", "nats-leaf://[redacted]@hub:7422"},
		{"nats://a:b@h1,c:d@h2:4222", "nats://h1,h2:4222", "nats://[redacted]@h1,[redacted]@h2:4222"},
		{"host:4222", "host:4222", "host:4222"},
	} {
		if got := Strip(c.in); got != c.strip {
			t.Errorf("Strip(%q) = %q, want %q", c.in, got, c.strip)
		}
		if got := Redact(c.in); got != c.redact {
			t.Errorf("Redact(%q) = %q, want %q", c.in, got, c.redact)
		}
	}
}
