package cli

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestManExamplesAligned: an example block (indented lines in a command's Long) is
// kept as written in its man page, every line with the same indent; before, the
// page's first example line lost its indent and the second kept it, so man showed the
// second two columns right of the first.
func TestManExamplesAligned(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"Text.\n\n  ex one\n  ex two", "Text.\n\n```\n  ex one\n  ex two\n```"},
		{"Text.\n\n  ex one\n\nMore.", "Text.\n\n```\n  ex one\n```\n\nMore."},
		// A line indented inside a paragraph continues it: not an example.
		{"Text\n  more text", "Text\n  more text"},
		{"No examples.", "No examples."},
	} {
		if got := manLong(tc.in); got != tc.want {
			t.Errorf("manLong(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}

	dir := t.TempDir()
	root := NewRootCommand(IO{Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}, Env: func(string) string { return "" }})
	run, _, err := root.Find([]string{"workload", "run"})
	if err != nil {
		t.Fatal(err)
	}
	long := run.Long
	if err := GenDocs(root, filepath.Join(dir, "man"), filepath.Join(dir, "completions")); err != nil {
		t.Fatal(err)
	}
	if run.Long != long {
		t.Errorf("GenDocs left --help's text changed:\n%s", run.Long)
	}
	pages, _ := filepath.Glob(filepath.Join(dir, "man", "*.1"))
	if len(pages) < 10 {
		t.Fatalf("%d man pages generated", len(pages))
	}
	examples := 0
	for _, p := range pages {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		// Outside .EX/.EE (and the options' tab-indented descriptions), a line that
		// starts with spaces is an example line that kept its indent in filled text.
		in := false
		for i, l := range strings.Split(string(b), "\n") {
			switch {
			case l == ".EX":
				in = true
				examples++
			case l == ".EE":
				in = false
			case !in && strings.HasPrefix(l, " "):
				t.Errorf("%s:%d: %q is indented in filled text", filepath.Base(p), i+1, l)
			}
		}
	}
	if examples == 0 {
		t.Error("no example block in any page: nexctl workload run has one")
	}
	// As man shows it, when man is here: both example lines at the same column.
	if _, err := exec.LookPath("man"); err != nil {
		t.Log("man not installed: the rendered page is not checked")
		return
	}
	cmd := exec.Command("man", "-l", filepath.Join(dir, "man", "nexctl-workload-run.1"))
	cmd.Env = append(os.Environ(), "MANWIDTH=120", "MANPAGER=cat", "PAGER=cat")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("man -l: %v", err)
	}
	var indents []int
	for _, l := range strings.Split(string(out), "\n") {
		s := strings.TrimLeft(l, " ")
		if strings.HasPrefix(s, "nexctl workload run --name web") || strings.HasPrefix(s, "nexctl workload run -f Nexfile") {
			indents = append(indents, len(l)-len(s))
		}
	}
	if len(indents) != 2 || indents[0] != indents[1] {
		t.Errorf("example lines of nexctl-workload-run(1) at columns %v, want two at the same:\n%s", indents, out)
	}
}
