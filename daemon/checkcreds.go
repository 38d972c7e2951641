package daemon

import (
	"fmt"
	"time"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/natsconn"
)

// credsSoon is how close to its expiry a creds file's JWT gets a word from --check.
const credsSoon = 7 * 24 * time.Hour

// checkCredsFiles is --check's reading of the creds files the configuration names
// (nats.creds_file, nats.leaf_creds): each must hold a user JWT and its user seed,
// decodable, the seed the JWT's user, the JWT valid now (natsconn.CheckCredsFile).
// The loader checked only their permissions: a creds file cut, swapped or expired
// passed --check and failed at start as the server's "Authorization Violation" or
// "user authentication expired". Each line is a "# " comment; each problem names the
// key and the file.
func checkCredsFiles(cfg *config.Config, now time.Time) (lines []string, problems []error) {
	for _, f := range []struct{ key, path string }{{"nats.creds_file", cfg.NATS.CredsFile}, {"nats.leaf_creds", cfg.NATS.LeafCreds}} {
		if f.path == "" {
			continue
		}
		info, err := natsconn.CheckCredsFile(f.path, now)
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: %w", f.key, err))
			continue
		}
		switch {
		case info.Expires.IsZero():
			lines = append(lines, fmt.Sprintf("# %s: %s: user %s, its JWT does not expire", f.key, f.path, info.User))
		case info.Expires.Sub(now) < credsSoon:
			lines = append(lines, fmt.Sprintf("# %s: %s: user %s, its JWT expires at %s, in %s: renew it", f.key, f.path, info.User,
				info.Expires.Format(time.RFC3339), info.Expires.Sub(now).Round(time.Minute)))
		default:
			lines = append(lines, fmt.Sprintf("# %s: %s: user %s, its JWT expires at %s", f.key, f.path, info.User, info.Expires.Format(time.RFC3339)))
		}
	}
	return lines, problems
}
