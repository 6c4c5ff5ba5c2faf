package daemon

import (
	"encoding/json"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/daemon/buildinfo"
	"github.com/tulle-net/tulle/subnet"
)

// tulleMark is the BackendData a Tulle host puts in its lease. Flannel's udp
// backend never reads BackendData, and BackendType stays empty as flannel's
// udp hosts leave it, so a flannel host treats the lease as any udp lease.
type tulleMark struct {
	Tulle *tulleInfo `json:"tulle,omitempty"`
}

type tulleInfo struct {
	Version string `json:"version"`
	// Features are what the data plane offers peers that also list them
	// (udp.Features, e.g. "partial-checksum"); the data plane reads them
	// from the peers' leases.
	Features []string `json:"features,omitempty"`
}

// backendData is our lease's BackendData:
// {"tulle":{"version":"v0.1.0","features":["partial-checksum"]}}, without
// "partial-checksum" when partialChecksums is false (--partial-checksums).
func backendData(partialChecksums bool) json.RawMessage {
	var features []string
	for _, f := range udp.Features() {
		if f != udp.FeaturePartialChecksum || partialChecksums {
			features = append(features, f)
		}
	}
	b, _ := json.Marshal(tulleMark{Tulle: &tulleInfo{Version: buildinfo.Get().Version, Features: features}})
	return b
}

// Host kinds, as `tulled status` shows them.
const (
	hostTulle   = "tulle"
	hostFlannel = "flannel"
)

// hostKind tells who holds a lease: "tulle" (with its version) when
// BackendData carries Tulle's mark, else "flannel" (a flannel udp host
// writes no BackendType; another backend's type is appended, e.g.
// "flannel vxlan").
func hostKind(a subnet.LeaseAttrs) (kind, version string) {
	if len(a.BackendData) > 0 {
		var m tulleMark
		if json.Unmarshal(a.BackendData, &m) == nil && m.Tulle != nil {
			return hostTulle, m.Tulle.Version
		}
	}
	if a.BackendType == "" || a.BackendType == "udp" {
		return hostFlannel, ""
	}
	return hostFlannel + " " + a.BackendType, ""
}
