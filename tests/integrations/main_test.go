package integrations

import (
	"fmt"
	"os"
	"testing"

	"github.com/tulle-net/tulle/tests/testbed"
)

// TestMain removes the testbed's per-process directory (built binaries)
// after the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if err := testbed.Cleanup(); err != nil {
		fmt.Fprintln(os.Stderr, "testbed cleanup:", err)
	}
	os.Exit(code)
}
