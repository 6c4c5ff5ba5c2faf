package config

import (
	"flag"
	"io"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestUsagePrintsEveryFlagWithItsRealDefault reads the help of the daemon
// and of every subcommand back: each flag is shown, and the default it
// shows is the flag's default (a duration parses back to the same value:
// "10s" once printed as "1").
func TestUsagePrintsEveryFlagWithItsRealDefault(t *testing.T) {
	var c Config
	var r rawFlags
	var s Status
	var endpoints string
	var d DockerOpts
	type command struct {
		name  string
		fs    *FlagSet
		usage func(io.Writer)
	}
	commands := []command{
		{"tulled", daemonFlagSet(&c, &r), Usage},
		{"tulled status", statusFlagSet(&s, &endpoints), StatusUsage},
		{"tulled docker-opts", dockerOptsFlagSet(&d), DockerOptsUsage},
	}
	for _, v := range PolicyVerbs {
		var host string
		commands = append(commands, command{"tulled policy " + v.Verb, policyFlagSet(&Policy{Verb: v.Verb}, &endpoints, &host),
			func(w io.Writer) { PolicyUsage(w, v.Verb) }})
	}
	for _, cmd := range commands {
		var b strings.Builder
		cmd.usage(&b)
		help := b.String()
		n := 0
		short := map[string]bool{} // -c is --combined, shown on its line
		for _, s := range cmd.fs.short {
			short[s] = true
		}
		cmd.fs.VisitAll(func(f *flag.Flag) {
			if short[f.Name] {
				return
			}
			n++
			line := regexp.MustCompile(`(?m)^\s+(?:-[a-zA-Z], )?--` + regexp.QuoteMeta(f.Name) + `\b.*$`).FindString(help)
			if line == "" {
				t.Errorf("%s --help does not show --%s:\n%s", cmd.name, f.Name, help)
				return
			}
			m := regexp.MustCompile(`\(default (.*)\)$`).FindStringSubmatch(line)
			switch f.DefValue {
			case "", "0", "false", "0s":
				if m != nil {
					t.Errorf("%s --%s: shows a default for the zero value %q: %q", cmd.name, f.Name, f.DefValue, line)
				}
				return
			}
			if m == nil {
				t.Errorf("%s --%s: default %q not shown: %q", cmd.name, f.Name, f.DefValue, line)
				return
			}
			shown := m[1]
			if want, err := time.ParseDuration(f.DefValue); err == nil {
				got, err := time.ParseDuration(shown)
				if err != nil || got != want {
					t.Errorf("%s --%s: shows default %q, want %v", cmd.name, f.Name, shown, want)
				}
				return
			}
			if uq, err := strconv.Unquote(shown); err == nil {
				shown = uq
			}
			if shown != f.DefValue {
				t.Errorf("%s --%s: shows default %q, want %q", cmd.name, f.Name, shown, f.DefValue)
			}
		})
		if n == 0 {
			t.Errorf("%s: no flags", cmd.name)
		}
	}
}

func TestDurationsAreShownShortAndExact(t *testing.T) {
	for d, want := range map[time.Duration]string{
		10 * time.Second:                     "10s",
		10 * time.Minute:                     "10m",
		24 * time.Hour:                       "24h",
		90 * time.Minute:                     "1h30m",
		time.Hour + time.Second:              "1h0m1s",
		90 * time.Second:                     "1m30s",
		500 * time.Millisecond:               "500ms",
		20 * time.Second:                     "20s",
		100 * time.Hour:                      "100h",
		time.Hour + 10*time.Second:           "1h0m10s",
		2*time.Minute + 500*time.Millisecond: "2m0.5s",
	} {
		if got := durationText(d); got != want {
			t.Errorf("durationText(%v) = %q, want %q", d, got, want)
		}
	}
}
