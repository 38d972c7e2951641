// Command gen writes nexctl's man pages and shell completions:
//
//	go run ./internal/cli/gen [-man contrib/man] [-completions contrib/completions]
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/nexd-project/nexd/internal/cli"
)

func main() {
	man := flag.String("man", "contrib/man", "directory for man pages")
	compl := flag.String("completions", "contrib/completions", "directory for shell completions")
	flag.Parse()
	// Defaults must not depend on the generating machine's environment.
	root := cli.NewRootCommand(cli.IO{Stdout: os.Stdout, Stderr: os.Stderr, Env: func(string) string { return "" }})
	if err := cli.GenDocs(root, *man, *compl); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}
