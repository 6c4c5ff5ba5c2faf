// Package buildinfo says which tulled this is: the version and revision set
// at link time, with the module's build information as the fallback.
//
// Release builds set both with the linker:
//
//	go build -ldflags "-X github.com/tulle-net/tulle/daemon/buildinfo.version=v0.1.0 \
//	    -X github.com/tulle-net/tulle/daemon/buildinfo.revision=$(git rev-parse HEAD)" ./cmd/tulled
package buildinfo

import (
	"runtime"
	"runtime/debug"
	"sync"
)

// Set by -ldflags "-X ...". Empty means "ask runtime/debug".
var (
	version  string
	revision string
)

// Info is the identity of the running binary.
type Info struct {
	Version   string // e.g. "v0.1.0"; "devel" for an untagged build
	Revision  string // VCS revision, "unknown" when not recorded
	GoVersion string // e.g. "go1.26.8"
}

var (
	once sync.Once
	info Info
)

// Get returns the build identity. It never returns empty fields.
func Get() Info {
	once.Do(func() {
		info = Info{Version: version, Revision: revision, GoVersion: runtime.Version()}
		if bi, ok := debug.ReadBuildInfo(); ok {
			if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
				info.Version = bi.Main.Version
			}
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" && info.Revision == "" {
					info.Revision = s.Value
				}
			}
		}
		if info.Version == "" {
			info.Version = "devel"
		}
		if info.Revision == "" {
			info.Revision = "unknown"
		}
	})
	return info
}

// String is the one line `tulled --version` prints.
func (i Info) String() string {
	return "tulled " + i.Version + " (revision " + i.Revision + ", " + i.GoVersion + ")"
}
