package testkit

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// WriteFile writes data to path (mode 0644), creating missing parent directories,
// and returns path.
func WriteFile(t testing.TB, path, data string) string {
	t.Helper()
	return writeFile(t, path, data, 0o644)
}

// WriteExecutable is WriteFile with mode 0755, for scripts.
func WriteExecutable(t testing.TB, path, data string) string {
	t.Helper()
	return writeFile(t, path, data, 0o755)
}

func writeFile(t testing.TB, path, data string, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	// WriteFile keeps the mode of an existing file.
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// PublicDir returns a new directory that every user may traverse and read (0755),
// removed when t ends. t.TempDir() is private to its owner, so a test that runs a
// process as another user puts that process's binary and sockets here.
func PublicDir(t testing.TB) string {
	t.Helper()
	dir := OwnedTempDir(t, "nexd-test-public-")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// CopyFile copies src to dst with mode and returns dst.
func CopyFile(t testing.TB, src, dst string, mode os.FileMode) string {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dst, mode); err != nil {
		t.Fatal(err)
	}
	return dst
}
