package lint

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// firstKey is, for each slog.Logger method, the index of its first key/value
// argument.
var firstKey = map[string]int{
	"Debug": 1, "Info": 1, "Warn": 1, "Error": 1,
	"DebugContext": 2, "InfoContext": 2, "WarnContext": 2, "ErrorContext": 2,
	"Log": 3, "With": 0,
}

// TestLogErrorKeyIsErr fails for a log call that names an attribute "error", or logs
// a value named err (or *Err, e.g. ctx.Err()) under any key but "err".
func TestLogErrorKeyIsErr(t *testing.T) {
	root := moduleRoot(t)
	var bad []string
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); path != root && (strings.HasPrefix(n, ".") || n == "testdata" || n == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		// Tests log little and call t.Error, which shares a name with slog's Error.
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			for _, p := range checkCall(call) {
				rel, _ := filepath.Rel(root, fset.Position(p.pos).Filename)
				bad = append(bad, fmt.Sprintf("%s:%d: %s", rel, fset.Position(p.pos).Line, p.msg))
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(bad) > 0 {
		t.Errorf("log attributes holding an error must be keyed \"err\":\n%s", strings.Join(bad, "\n"))
	}
}

type problem struct {
	pos token.Pos
	msg string
}

func checkCall(call *ast.CallExpr) []problem {
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return nil
	}
	// slog.String("error", …), slog.Any("cause", err): an attribute built by hand.
	if isSlog(sel) {
		if len(call.Args) >= 2 {
			if p, ok := checkPair(call.Args[0], call.Args[1]); ok {
				return []problem{p}
			}
		}
		return nil
	}
	first, ok := firstKey[sel.Sel.Name]
	if !ok || len(call.Args) <= first {
		return nil
	}
	var out []problem
	for i := first; i < len(call.Args); {
		if c, ok := call.Args[i].(*ast.CallExpr); ok {
			if s, ok := c.Fun.(*ast.SelectorExpr); ok && isSlog(s) {
				i++ // an slog.Attr takes one argument; checked on its own
				continue
			}
		}
		if i+1 >= len(call.Args) {
			break
		}
		if p, ok := checkPair(call.Args[i], call.Args[i+1]); ok {
			out = append(out, p)
		}
		i += 2
	}
	return out
}

// checkPair reports a key "error", or an error value under a key other than "err".
func checkPair(key, val ast.Expr) (problem, bool) {
	lit, ok := key.(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return problem{}, false
	}
	k, err := strconv.Unquote(lit.Value)
	if err != nil {
		return problem{}, false
	}
	if k == "error" {
		return problem{lit.Pos(), `key "error", want "err"`}, true
	}
	if k != "err" && isErrValue(val) {
		return problem{lit.Pos(), fmt.Sprintf("error value under key %q, want \"err\"", k)}, true
	}
	return problem{}, false
}

// isErrValue: err, someErr, x.err, ctx.Err().
func isErrValue(e ast.Expr) bool {
	switch v := e.(type) {
	case *ast.Ident:
		return v.Name == "err" || strings.HasSuffix(v.Name, "Err")
	case *ast.SelectorExpr:
		return v.Sel.Name == "err"
	case *ast.CallExpr:
		if s, ok := v.Fun.(*ast.SelectorExpr); ok && len(v.Args) == 0 {
			return s.Sel.Name == "Err"
		}
	}
	return false
}

func isSlog(sel *ast.SelectorExpr) bool {
	x, ok := sel.X.(*ast.Ident)
	return ok && x.Name == "slog" && sel.Sel.Name != "New" && sel.Sel.Name != "Default"
}

// moduleRoot is the directory holding go.mod, above this package.
func moduleRoot(t *testing.T) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test's directory")
		}
		dir = parent
	}
}
