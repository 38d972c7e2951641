package lint

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestFuzzTargetsListed fails for a fuzz target `make fuzz` does not run (the Makefile's
// FUZZ_TARGETS, package:Target) and for a listed one that is gone: a parser's fuzz
// target that no one runs guards nothing.
func TestFuzzTargetsListed(t *testing.T) {
	root := moduleRoot(t)
	fuzzFunc := regexp.MustCompile(`^func (Fuzz[A-Za-z0-9_]*)\(`)
	var have []string
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); path != root && (strings.HasPrefix(n, ".") || n == "testdata" || n == "vendor" || n == "third_party") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if m := fuzzFunc.FindStringSubmatch(sc.Text()); m != nil {
				rel, _ := filepath.Rel(root, filepath.Dir(path))
				have = append(have, filepath.ToSlash(rel)+":"+m[1])
			}
		}
		return sc.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(mk), "\nFUZZ_TARGETS =")
	if !ok {
		t.Fatal("the Makefile has no FUZZ_TARGETS")
	}
	var listed []string
	for _, line := range strings.Split(rest, "\n") {
		f := strings.Fields(strings.TrimSuffix(strings.TrimSpace(line), "\\"))
		listed = append(listed, f...)
		if !strings.HasSuffix(strings.TrimSpace(line), "\\") {
			break
		}
	}
	for _, h := range have {
		if !slices.Contains(listed, h) {
			t.Errorf("fuzz target %s is not in the Makefile's FUZZ_TARGETS", h)
		}
	}
	for _, l := range listed {
		if !slices.Contains(have, l) {
			t.Errorf("the Makefile's FUZZ_TARGETS lists %s, which does not exist", l)
		}
	}
	if len(have) == 0 {
		t.Fatal("no fuzz targets found")
	}
}
