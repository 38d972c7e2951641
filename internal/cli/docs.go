package cli

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
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
	if err := doc.GenManTree(root, hdr, manDir); err != nil {
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
