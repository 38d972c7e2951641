package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// GenDocs writes man pages for root and its subcommands into manDir and bash, zsh and
// fish completions into complDir. SOURCE_DATE_EPOCH fixes the man pages' date for
// reproducible packages.
func GenDocs(root *cobra.Command, manDir, complDir string) error {
	for _, d := range []string{manDir, complDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	date := time.Now().UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, err)
		}
		date = time.Unix(sec, 0).UTC()
	}
	root.DisableAutoGenTag = true
	hdr := &doc.GenManHeader{Title: "NEXCTL", Section: "1", Source: "nexd", Manual: "nexd manual", Date: &date}
	restore := forMan(root)
	err := doc.GenManTree(root, hdr, manDir)
	restore()
	if err != nil {
		return fmt.Errorf("man pages into %s: %w", manDir, err)
	}
	name := root.Name()
	gens := []struct {
		file string
		gen  func(string) error
	}{
		{name + ".bash", func(p string) error { return root.GenBashCompletionFileV2(p, true) }},
		{"_" + name, root.GenZshCompletionFile},
		{name + ".fish", func(p string) error { return root.GenFishCompletionFile(p, true) }},
	}
	for _, g := range gens {
		if err := g.gen(filepath.Join(complDir, g.file)); err != nil {
			return fmt.Errorf("completion %s: %w", g.file, err)
		}
	}
	return nil
}

// forMan gives every command's Long its man page form (manLong) until the returned
// func puts --help's back.
func forMan(c *cobra.Command) (restore func()) {
	long := c.Long
	c.Long = manLong(long)
	var subs []func()
	for _, sub := range c.Commands() {
		subs = append(subs, forMan(sub))
	}
	return func() {
		c.Long = long
		for _, r := range subs {
			r()
		}
	}
}

// manLong fences each block of indented lines that starts a paragraph (examples, as
// --help shows them) as code, so that the man page keeps them as written (.EX): read
// as Markdown they were a paragraph, whose first line lost its indent and the next
// kept theirs, so the second example line stood out by two columns.
func manLong(long string) string {
	lines := strings.Split(long, "\n")
	out := make([]string, 0, len(lines)+2)
	in := false
	for i, l := range lines {
		indented := strings.HasPrefix(l, "  ") || strings.HasPrefix(l, "\t")
		switch {
		case in && !indented:
			out = append(out, "```")
			in = false
		case !in && indented && (i == 0 || strings.TrimSpace(lines[i-1]) == ""):
			out = append(out, "```")
			in = true
		}
		out = append(out, l)
	}
	if in {
		out = append(out, "```")
	}
	return strings.Join(out, "\n")
}

// genDocsCommand is the hidden "__gen-docs DIR" used by packaging: DIR/man and
// DIR/completions.
func genDocsCommand(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:    "__gen-docs DIR",
		Short:  "Write man pages (DIR/man) and shell completions (DIR/completions)",
		Hidden: true,
		Args:   exactArgs(1, "DIR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return GenDocs(root, filepath.Join(args[0], "man"), filepath.Join(args[0], "completions"))
		},
	}
}
