package daemon

import (
	"strings"
	"testing"
)

// A refused command line is named once by its command, whichever of
// tulled's parsers refused it, and points to that command's help.
func TestRefusedCommandLinesNameTheirCommandOnce(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--bogus"}, "tulled: flag provided but not defined: -bogus\nRun 'tulled --help' for the usage.\n"},
		{[]string{"status", "extra"}, "tulled status: unexpected argument \"extra\"\nRun 'tulled status --help' for the usage.\n"},
		{[]string{"status", "--timeout=-1s"}, "tulled status: invalid --timeout -1s: must be positive\nRun 'tulled status --help' for the usage.\n"},
		{[]string{"docker-opts", "-k", ""}, "tulled docker-opts: the key (-k) is empty\nRun 'tulled docker-opts --help' for the usage.\n"},
		{[]string{"policy", "list", "--bogus"}, "tulled policy: flag provided but not defined: -bogus\nRun 'tulled policy --help' for the usage.\n"},
		{[]string{"policy", "list", "extra"}, "tulled policy list: unexpected argument \"extra\"\nRun 'tulled policy --help' for the usage.\n"},
	} {
		code, out, errOut := runMain(t, nil, tc.args...)
		if code != ExitUsage || out != "" || errOut != tc.want {
			t.Errorf("tulled %s: exit %d, stdout %q, stderr\n%s\nwant exit %d and\n%s", strings.Join(tc.args, " "), code, out, errOut, ExitUsage, tc.want)
		}
	}
}
