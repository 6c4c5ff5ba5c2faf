// Command tulled is the Tulle overlay daemon, a drop-in replacement for
// flanneld's udp backend. See `tulled --help` and package daemon.
package main

import (
	"os"

	"github.com/tulle-net/tulle/daemon"
)

func main() {
	os.Exit(daemon.Main(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
