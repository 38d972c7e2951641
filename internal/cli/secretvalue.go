package cli

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/control"
)

// maxSecretValue bounds a secret's value read from stdin or the prompt.
const maxSecretValue = control.MaxBodyBytes / 2

// secretValue is the value `nexctl secret set NS KEY [VALUE|-]` sets. A value in the
// command line is refused unless inArgv: /proc/<pid>/cmdline is readable by every
// local user while nexctl runs (TestAttackLocalUserReadsSecretSetArgv), and shells keep
// it in their history. Without one (or with "-") it is read from stdin: at a prompt
// without echo on a terminal, else all of stdin with one trailing newline dropped; a
// value over the bound is refused, not cut short, and an empty one needs "-".
func (a *app) secretValue(ctx context.Context, ns, key string, args []string, inArgv bool) ([]byte, error) {
	if len(args) == 3 && args[2] != "-" {
		if !inArgv {
			return nil, usagef("secret set: a VALUE in the command line can be read by every local user in /proc/<pid>/cmdline while nexctl runs, and stays in the shell's history; "+
				"leave it out to be asked for it (no echo), or give it on stdin (printf '%%s' \"$VALUE\" | nexctl secret set %s %s), or add --insecure-argv to take it from the command line", ns, key)
		}
		return []byte(args[2]), nil
	}
	if f, ok := a.io.Stdin.(*os.File); ok {
		if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
			return promptHidden(ctx, int(f.Fd()), a.io.Stderr, fmt.Sprintf("Value of secret %s/%s (not shown): ", ns, key))
		}
	}
	// One byte over the bound tells a value that is too long from one that fits: cut
	// short, it would be set as it is, a different secret.
	b, err := io.ReadAll(io.LimitReader(bufio.NewReader(a.io.Stdin), maxSecretValue+1))
	if err != nil {
		return nil, fmt.Errorf("read secret value from stdin: %w", err)
	}
	if len(b) > maxSecretValue {
		return nil, fmt.Errorf("secret set %s %s: the value on stdin is more than %d bytes; nothing was set", ns, key, maxSecretValue)
	}
	b = bytes.TrimSuffix(bytes.TrimSuffix(b, []byte("\n")), []byte("\r"))
	// Without '-', an empty stdin is more likely a value that went missing (a script's
	// unquoted empty variable, once VALUE, now left out; stdin /dev/null under cron or a
	// unit) than an empty secret meant to replace the one set.
	if len(b) == 0 && len(args) < 3 {
		return nil, fmt.Errorf("secret set %s %s: no value on stdin; nothing was set (give '-' as the third argument to set an empty value)", ns, key)
	}
	return b, nil
}

// promptHidden asks on w and reads one line from the terminal fd with its echo off,
// restoring the terminal however it returns. The read polls, so an interrupt (ctx:
// nexctl's SIGINT and SIGTERM) ends it and gives the terminal back its echo.
func promptHidden(ctx context.Context, fd int, w io.Writer, prompt string) ([]byte, error) {
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, fmt.Errorf("secret value prompt: %w", err)
	}
	hidden := *old
	hidden.Lflag &^= unix.ECHO
	hidden.Lflag |= unix.ICANON | unix.ECHONL // a line at a time; the Enter still shows
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &hidden); err != nil {
		return nil, fmt.Errorf("secret value prompt: turn echo off: %w", err)
	}
	defer func() { _ = unix.IoctlSetTermios(fd, unix.TCSETS, old) }()
	fmt.Fprint(w, prompt)
	var line []byte
	buf := make([]byte, 4096)
	for {
		if err := ctx.Err(); err != nil {
			fmt.Fprintln(w)
			return nil, fmt.Errorf("secret value prompt: %w", err)
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 200)
		if errors.Is(err, unix.EINTR) || (err == nil && n == 0) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("secret value prompt: %w", err)
		}
		r, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("secret value prompt: %w", err)
		}
		line = append(line, buf[:r]...)
		if i := bytes.IndexByte(line, '\n'); i >= 0 || r == 0 {
			if i >= 0 {
				line = line[:i]
			}
			line = bytes.TrimSuffix(line, []byte("\r"))
			if len(line) == 0 {
				return nil, errors.New("secret value prompt: no value entered")
			}
			return line, nil
		}
		if len(line) > maxSecretValue {
			return nil, fmt.Errorf("secret value prompt: more than %d bytes", maxSecretValue)
		}
	}
}
