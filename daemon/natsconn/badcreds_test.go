package natsconn

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testnats"
)

// TestBadCredsFileNamed: a creds file that is not one (garbage, a JWT without its seed,
// a seed without its JWT) is refused with an error naming the flag and the file, not
// only the NATS library's words.
func TestBadCredsFileNamed(t *testing.T) {
	op, s := operatorServer(t)
	ujwt, useed := op.User(t, "U", nil)
	text := string(testnats.Creds(t, ujwt, useed))
	seedAt := strings.Index(text, "-----BEGIN USER NKEY SEED-----")
	dir := t.TempDir()
	for name, body := range map[string]string{
		"garbage":    "not a creds file\n",
		"jwt alone":  text[:seedAt],
		"seed alone": text[seedAt:],
		"empty":      "",
	} {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".creds")
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Connect(ctxT(t), Options{Servers: []string{s.ClientURL()}, CredsFile: path}, nil)
		if err == nil || !strings.Contains(err.Error(), "--nats.creds-file") || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: %v, want an error naming --nats.creds-file and %s", name, err, path)
		}
	}
}
