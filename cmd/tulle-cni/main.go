// Command tulle-cni is a CNI plugin (spec 0.1.0 to 1.1.0) that attaches
// containers to the Tulle overlay: it reads tulled's subnet.env and
// delegates to the bridge plugin with host-local IPAM, as flannel's CNI
// plugin does. See deploy/cni/ for network configs and README.md (Integrations).
package main

import (
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/tulle-net/tulle/cmd/tulle-cni/internal/tullecni"
	"github.com/tulle-net/tulle/daemon/buildinfo"
)

func main() {
	bi := buildinfo.Get()
	about := "CNI plugin tulle-cni " + bi.Version + " (revision " + bi.Revision + "): attaches containers to the Tulle overlay"
	p := &tullecni.Plugin{Stdout: os.Stdout}
	skel.PluginMainFuncs(p.Funcs(), version.All, about)
}
