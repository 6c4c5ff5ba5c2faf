package tools_test

import (
	"context"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

// repoRoot is the directory of go.mod above the test's directory.
func repoRoot(t *testing.T) string {
	t.Helper()
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
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// goFile is one parsed Go file of the repository.
type goFile struct {
	rel  string // path relative to the repository root
	fset *token.FileSet
	f    *ast.File
}

// repoGoFiles parses every Go file of the repository (testdata and
// hidden directories excluded, as the go command does).
func repoGoFiles(t *testing.T) []goFile {
	t.Helper()
	root := repoRoot(t)
	var out []goFile
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (name == "testdata" || name == "vendor" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") {
			return nil
		}
		fset := token.NewFileSet()
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		out = append(out, goFile{rel: filepath.ToSlash(rel), fset: fset, f: f})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 50 {
		t.Fatalf("found only %d Go files under %s: walked the wrong tree?", len(out), root)
	}
	return out
}

// Functions that start another program, by import path.
var execFuncs = map[string][]string{
	"os/exec":               {"Command", "CommandContext", "LookPath", "Cmd"},
	"os":                    {"StartProcess"},
	"syscall":               {"Exec", "ForkExec", "StartProcess"},
	"golang.org/x/sys/unix": {"Exec"},
}

// execUses returns "file:line: pkg.Name" for every use of a function (or
// the exec.Cmd type in a composite literal) that starts a program.
func execUses(g goFile) []string {
	local := map[string]string{} // local name -> import path
	for _, imp := range g.f.Imports {
		path, _ := strconv.Unquote(imp.Path.Value)
		if _, ok := execFuncs[path]; !ok {
			continue
		}
		name := filepath.Base(path)
		if imp.Name != nil {
			name = imp.Name.Name
		}
		local[name] = path
	}
	if len(local) == 0 {
		return nil
	}
	var uses []string
	report := func(n ast.Node, what string) {
		uses = append(uses, g.fset.Position(n.Pos()).String()+": "+what)
	}
	ast.Inspect(g.f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CompositeLit:
			// exec.Cmd{...} builds a command by hand.
			if sel, ok := n.Type.(*ast.SelectorExpr); ok {
				if id, ok := sel.X.(*ast.Ident); ok && local[id.Name] == "os/exec" && sel.Sel.Name == "Cmd" {
					report(n, "exec.Cmd{}")
				}
			}
		case *ast.SelectorExpr:
			id, ok := n.X.(*ast.Ident)
			if !ok {
				return true
			}
			path, ok := local[id.Name]
			if ok && n.Sel.Name != "Cmd" && slices.Contains(execFuncs[path], n.Sel.Name) {
				report(n, id.Name+"."+n.Sel.Name)
			}
		}
		return true
	})
	return uses
}

// TestOnlyPackageToolsStartsPrograms walks every Go file of the
// repository: a program started other than through tools.Command (or
// tools.LookPath) escapes the list, and so deps.sh.
func TestOnlyPackageToolsStartsPrograms(t *testing.T) {
	for _, g := range repoGoFiles(t) {
		if strings.HasPrefix(g.rel, "tests/tools/") && !strings.HasSuffix(g.rel, "_test.go") {
			continue
		}
		for _, u := range execUses(g) {
			t.Errorf("%s: starts a program without tools.Command; run it with tools.Command (or find it with tools.LookPath) and put it in %s", u, tools.ListFile)
		}
	}
}

// The check itself must find what it is meant to find.
func TestExecUsesFindsEveryWayToStartAProgram(t *testing.T) {
	src := `package x
import (
	ex "os/exec"
	"os"
	"syscall"
)
func f() {
	ex.Command("a")
	_ = ex.CommandContext
	ex.LookPath("b")
	_ = &ex.Cmd{Path: "c"}
	os.StartProcess("d", nil, nil)
	syscall.Exec("e", nil, nil)
	var _ *ex.ExitError // a type, not a start
	var _ ex.Cmd        // declaring is fine; building one by hand is not
}`
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "x.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := execUses(goFile{rel: "x.go", fset: fset, f: f})
	var names []string
	for _, u := range got {
		names = append(names, u[strings.LastIndex(u, " ")+1:])
	}
	want := []string{"ex.Command", "ex.CommandContext", "ex.LookPath", "exec.Cmd{}", "os.StartProcess", "syscall.Exec"}
	if !slices.Equal(names, want) {
		t.Errorf("found %q, want %q", names, want)
	}
}

// stringLiterals returns every string constant in the repository's Go
// files, except the helper's own.
func stringLiterals(t *testing.T) map[string]bool {
	out := map[string]bool{}
	for _, g := range repoGoFiles(t) {
		if strings.HasPrefix(g.rel, "tests/tools/") && !strings.HasSuffix(g.rel, "_test.go") {
			continue // the helper's own names (sh, ip, ...) do not count
		}
		ast.Inspect(g.f, func(n ast.Node) bool {
			if lit, ok := n.(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if s, err := strconv.Unquote(lit.Value); err == nil {
					out[s] = true
				}
			}
			return true
		})
	}
	return out
}

// TestEveryListedProgramIsUsed keeps the list honest the other way: a
// program nothing runs any more comes off it (and out of deps.sh). A
// program counts as used when its name (or, for a path, its base name) is
// a string in the code, or a listed library runs it, or a used program
// runs it for us (a "via" line).
func TestEveryListedProgramIsUsed(t *testing.T) {
	lits := stringLiterals(t)
	byLib := map[string]bool{}
	for _, l := range tools.Libraries() {
		for _, r := range l.Runs {
			byLib[r] = true
		}
	}
	via := map[string]string{}
	for _, v := range tools.Vias() {
		for _, r := range v.Runs {
			via[r] = v.Program
		}
	}
	var used func(name string, depth int) bool
	used = func(name string, depth int) bool {
		if lits[name] || lits[filepath.Base(name)] || byLib[name] {
			return true
		}
		runner, ok := via[name]
		return ok && depth < 10 && used(runner, depth+1) // go runs gcc, which runs as
	}
	for _, p := range tools.Programs() {
		if used(p.Name, 0) {
			continue
		}
		if p.Source == tools.SourceBuild && (lits[p.From[0]] || lits["./"+strings.TrimPrefix(p.From[0], "./")]) {
			continue
		}
		t.Errorf("%s is on the list (%s) but no Go code names it and no listed library runs it: take it off %s", p.Name, p.Source, tools.ListFile)
	}
}

// TestLibrariesThatRunProgramsAreListed finds the packages outside the
// standard library and this module, in the build of every package and
// test here, that import os/exec: each must be a "library" line naming
// what it runs, and each library line must still be in the build.
func TestLibrariesThatRunProgramsAreListed(t *testing.T) {
	root := repoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := tools.Command(ctx, "go", "list", "-deps", "-test", "-f",
		`{{if not .Standard}}{{.ImportPath}}{{range .Imports}} {{.}}{{end}}{{end}}`, "./...")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	module := "github.com/tulle-net/tulle/"
	found := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], module) || !slices.Contains(f[1:], "os/exec") {
			continue
		}
		found[f[0]] = true
	}
	listed := map[string]bool{}
	for _, l := range tools.Libraries() {
		listed[l.Package] = true
		if !found[l.Package] {
			t.Errorf("%s: library %s no longer runs programs in this build (or is gone): take its line off", tools.ListFile, l.Package)
		}
	}
	for pkg := range found {
		if !listed[pkg] {
			t.Errorf("%s imports os/exec: find out which programs it runs, list them, and add \"library %s PROGRAM...\" to %s", pkg, pkg, tools.ListFile)
		}
	}
}
