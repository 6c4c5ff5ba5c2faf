// Package tools runs the external programs of the tests, the demo and the
// benchmark. Every program they run is on one list, tools.list beside this
// file, which scripts/deps.sh reads to install what a fresh machine lacks;
// Command refuses a program that is not on it, and the package's tests fail
// when Go code in this repository runs a program any other way. So a tool
// installed by hand on one machine can not hide a gap in deps.sh.
package tools

import (
	"bufio"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

//go:embed tools.list
var listText string

// ListFile is the list's path relative to the repository root.
const ListFile = "tests/tools/tools.list"

// Sources of a program (the list's second column).
const (
	SourceDeb       = "deb"       // a Debian package; deps.sh installs it
	SourceDebFile   = "deb-file"  // one file out of a Debian package
	SourceEssential = "essential" // Debian's essential set
	SourceToolchain = "toolchain" // the Go toolchain
	SourceBuild     = "build"     // built by the tests from a Go package
)

// Program is one program line of the list.
type Program struct {
	// Name is what is run: a name looked up in PATH, or an absolute path.
	Name string
	// Source says where it comes from (SourceDeb, ...).
	Source string
	// From is the rest of the line: the Debian package (and, for
	// SourceDebFile, the file in it), or the Go package that is built.
	From []string
}

// Library is a Go package that runs programs itself (it imports os/exec);
// Runs are on the list as programs.
type Library struct {
	Package string
	Runs    []string
}

// Via is a listed program that runs other listed programs for us (go runs
// the C compiler for cgo).
type Via struct {
	Program string
	Runs    []string
}

// List is a parsed tools.list.
type List struct {
	Programs  []Program
	Libraries []Library
	Vias      []Via
}

var (
	parseOnce sync.Once
	list      List
	parseErr  error
)

func parsed() (List, error) {
	parseOnce.Do(func() {
		list, parseErr = Parse(listText)
	})
	return list, parseErr
}

// Parse reads a list in the format of tools.list.
func Parse(text string) (List, error) {
	var l List
	seen := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if f[0] == "library" || f[0] == "via" {
			if len(f) < 3 {
				return List{}, fmt.Errorf("%s:%d: want \"%s %s PROGRAM...\"", ListFile, n, f[0], map[string]string{"library": "GO-PACKAGE", "via": "PROGRAM"}[f[0]])
			}
			for _, r := range f[2:] {
				if !seen[r] {
					return List{}, fmt.Errorf("%s:%d: %s %s runs %s, which is not listed above it", ListFile, n, f[0], f[1], r)
				}
			}
			if f[0] == "library" {
				l.Libraries = append(l.Libraries, Library{Package: f[1], Runs: f[2:]})
			} else if !seen[f[1]] {
				return List{}, fmt.Errorf("%s:%d: via %s: %s is not listed above it", ListFile, n, f[1], f[1])
			} else {
				l.Vias = append(l.Vias, Via{Program: f[1], Runs: f[2:]})
			}
			continue
		}
		if len(f) < 2 {
			return List{}, fmt.Errorf("%s:%d: %q has no source", ListFile, n, f[0])
		}
		p := Program{Name: f[0], Source: f[1], From: f[2:]}
		args := map[string][2]int{SourceDeb: {1, 9}, SourceDebFile: {2, 2}, SourceEssential: {1, 1}, SourceToolchain: {0, 0}, SourceBuild: {1, 1}}
		k, ok := args[p.Source]
		if !ok {
			return List{}, fmt.Errorf("%s:%d: %s: unknown source %q", ListFile, n, p.Name, p.Source)
		}
		if len(p.From) < k[0] || len(p.From) > k[1] {
			return List{}, fmt.Errorf("%s:%d: %s: source %s takes %d to %d argument(s), got %q", ListFile, n, p.Name, p.Source, k[0], k[1], p.From)
		}
		if strings.Contains(p.Name, "/") && !filepath.IsAbs(p.Name) {
			return List{}, fmt.Errorf("%s:%d: %s: a path must be absolute", ListFile, n, p.Name)
		}
		if seen[p.Name] {
			return List{}, fmt.Errorf("%s:%d: %s is listed twice", ListFile, n, p.Name)
		}
		seen[p.Name] = true
		l.Programs = append(l.Programs, p)
	}
	return l, sc.Err()
}

func mustParsed() List {
	l, err := parsed()
	if err != nil {
		panic(err) // the embedded list is broken: its test says where
	}
	return l
}

// Programs returns the program lines of the list, in order.
func Programs() []Program { return slices.Clone(mustParsed().Programs) }

// Libraries returns the library lines of the list, in order.
func Libraries() []Library { return slices.Clone(mustParsed().Libraries) }

// Vias returns the via lines of the list, in order.
func Vias() []Via { return slices.Clone(mustParsed().Vias) }

// Lookup returns the list's line for name (a name or an absolute path as
// written in the list).
func Lookup(name string) (Program, bool) {
	progs := mustParsed().Programs
	i := slices.IndexFunc(progs, func(p Program) bool { return p.Name == name })
	if i < 0 {
		return Program{}, false
	}
	return progs[i], true
}

// Hint says how a listed program is obtained, for error messages.
func (p Program) Hint() string {
	switch p.Source {
	case SourceDeb:
		return "Debian package " + strings.Join(p.From, " ") + "; scripts/deps.sh installs it"
	case SourceEssential:
		return "Debian's essential package " + p.From[0]
	case SourceDebFile:
		return p.From[1] + " from Debian package " + p.From[0] + "; scripts/deps.sh installs it"
	case SourceToolchain:
		return "the Go toolchain, see README.md"
	case SourceBuild:
		return "built from " + p.From[0]
	}
	return p.Source
}

var (
	scriptsMu sync.Mutex
	scripts   = map[string]bool{}
)

// AllowScript lets Command run the script a test wrote at path, after
// checking that every program the script runs (runs) is on the list.
func AllowScript(path string, runs ...string) error {
	for _, r := range runs {
		if err := checkProgram(r); err != nil {
			return fmt.Errorf("script %s: %w", path, err)
		}
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	scriptsMu.Lock()
	scripts[abs] = true
	scriptsMu.Unlock()
	return nil
}

// ErrNotListed is wrapped by the error for a program that is not on the list.
var ErrNotListed = errors.New("not on the list of programs in " + ListFile)

func notListed(name string) error {
	return fmt.Errorf("tools: %s: %w; add it there with its Debian package (or how it is built), so scripts/deps.sh installs it on a fresh machine", name, ErrNotListed)
}

// program returns the list's line that allows running name: the line for
// an absolute path, or for its base name (a built binary in a temporary
// directory, a program found in PATH). ok is false for the running test
// binary and scripts allowed with AllowScript, which have no line.
func program(name string) (p Program, ok bool, err error) {
	if p, ok := Lookup(name); ok {
		return p, true, nil
	}
	if !strings.Contains(name, "/") {
		return Program{}, false, notListed(name)
	}
	abs, err := filepath.Abs(name)
	if err != nil {
		return Program{}, false, fmt.Errorf("tools: %s: %w", name, err)
	}
	if self, err := os.Executable(); err == nil && self == abs {
		return Program{}, false, nil
	}
	scriptsMu.Lock()
	script := scripts[abs]
	scriptsMu.Unlock()
	if script {
		return Program{}, false, nil
	}
	// A path allows the line of its base name unless that line is itself a
	// path (/usr/lib/cni/bridge does not make /tmp/x/bridge allowed).
	if p, ok := Lookup(filepath.Base(name)); ok {
		return p, true, nil
	}
	return Program{}, false, notListed(name)
}

func checkProgram(name string) error {
	_, _, err := program(name)
	return err
}

// Check returns nil if name may run with args: name is on the list, and so
// is every program it runs on the caller's behalf (`ip netns exec NS prog`,
// `nsenter ... prog`, `setpriv ... prog`, `unshare ... prog`, `env ...
// prog`, and the first command of `sh -c SCRIPT`).
func Check(name string, args ...string) error {
	for {
		if err := checkProgram(name); err != nil {
			return err
		}
		inner, innerArgs := runsNext(filepath.Base(name), args)
		if inner == "" {
			return nil
		}
		name, args = inner, innerArgs
	}
}

// Options that take a separate value, of the programs that run another.
var valueOptions = map[string][]string{
	"ip":      {"-n", "-netns", "-b", "-batch", "-rc", "-rcvbuf", "-c", "-color"},
	"nsenter": {"-t", "--target", "-S", "--setuid", "-G", "--setgid"},
	"unshare": {"-S", "--setuid", "-G", "--setgid", "--map-user", "--map-group", "--map-users", "--map-groups", "--propagation", "--setgroups", "-w", "--wd", "-R", "--root", "--monotonic", "--boottime"},
	"env":     {"-u", "--unset", "-C", "--chdir", "-S", "--split-string"},
	"setpriv": {"--ruid", "--euid", "--rgid", "--egid", "--reuid", "--regid", "--groups", "--inh-caps", "--ambient-caps", "--bounding-set", "--securebits", "--pdeathsig", "--selinux-label", "--apparmor-profile", "--landlock-access", "--landlock-rule", "--seccomp-filter"},
}

// Shell words that run no program.
var shellBuiltins = []string{"echo", "printf", "set", "test", "[", "cd", "export", "true", "false", ":", "read", "exit", "if", "for", "while", "case", "umask", "ulimit", "trap", "wait", "kill"}

// runsNext returns the program that base (a program's base name) runs
// with args, and that program's arguments; "" when it runs none.
func runsNext(base string, args []string) (string, []string) {
	switch base {
	case "ip":
		i := skipOptions(args, valueOptions["ip"])
		all := slices.Contains(args[:i], "-all") || slices.Contains(args[:i], "-a")
		if len(args) > i+1 && args[i] == "netns" && args[i+1] == "exec" {
			j := i + 3 // netns exec NAME prog
			if all {
				j = i + 2
			}
			if len(args) > j {
				return args[j], args[j+1:]
			}
		}
	case "nsenter", "unshare", "setpriv":
		if i := skipOptions(args, valueOptions[base]); i < len(args) {
			return args[i], args[i+1:]
		}
	case "env":
		i := skipOptions(args, valueOptions[base])
		for i < len(args) && strings.Contains(args[i], "=") {
			i++ // NAME=VALUE
		}
		if i < len(args) {
			return args[i], args[i+1:]
		}
	case "sh", "bash", "dash":
		for i, a := range args {
			if a == "-c" && i+1 < len(args) {
				words := strings.Fields(args[i+1])
				for len(words) > 0 && words[0] == "exec" {
					words = words[1:]
				}
				if len(words) == 0 || slices.Contains(shellBuiltins, words[0]) {
					return "", nil
				}
				return words[0], words[1:]
			}
		}
	}
	return "", nil
}

// skipOptions returns the index of the first argument that is not an
// option (or an option's value); "--" ends the options.
func skipOptions(args, withValue []string) int {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return i + 1
		case !strings.HasPrefix(a, "-") || a == "-":
			return i
		case slices.Contains(withValue, a):
			i++ // its value
		}
	}
	return len(args)
}

// LookPath finds a program on the list in PATH (or checks a listed path);
// a missing one's error says where it comes from.
func LookPath(name string) (string, error) {
	p, listed, err := program(name)
	if err != nil {
		return "", err
	}
	path, err := exec.LookPath(name)
	if err != nil {
		if listed {
			return "", fmt.Errorf("%w (%s)", err, p.Hint())
		}
		return "", err
	}
	return path, nil
}

// Command returns the exec.Cmd that runs name with args, like
// exec.CommandContext, if Check allows it. Otherwise, and when a listed
// program is not installed, the command's Start (Run, Output, ...)
// returns an error that says why and how to get the program.
func Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	argv := append([]string{name}, args...)
	refuse := func(err error) *exec.Cmd {
		return &exec.Cmd{Path: name, Args: argv, Err: err}
	}
	if err := Check(name, args...); err != nil {
		return refuse(err)
	}
	path, err := LookPath(name)
	if err != nil {
		return refuse(err)
	}
	// A program run on our behalf by ip netns exec, nsenter, ... is looked
	// up too, so a missing one says which package it is in instead of
	// failing inside the wrapper.
	for n, a := name, args; ; {
		inner, innerArgs := runsNext(filepath.Base(n), a)
		if inner == "" {
			break
		}
		if _, err := LookPath(inner); err != nil {
			return refuse(fmt.Errorf("%s runs %w", filepath.Base(name), err))
		}
		n, a = inner, innerArgs
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Args[0] = name // argv[0] as the caller wrote it
	return cmd
}
