package daemon

import (
	"encoding/json"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/daemon/buildinfo"
	"github.com/tulle-net/tulle/subnet"
)

// backendData is our lease's BackendData (udp.HostInfo):
// {"tulle":{"version":"v0.1.0","features":["partial-checksum"]}}, without
// "partial-checksum" when partialChecksums is false (--partial-checksums),
// with the features in more after it (udp.FeatureDirect).
func backendData(partialChecksums bool, more ...string) json.RawMessage {
	info := udp.HostInfo{Version: buildinfo.Get().Version}
	if partialChecksums {
		info.Features = []string{udp.FeaturePartialChecksum}
	}
	info.Features = append(info.Features, more...)
	return info.BackendData()
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
	if info, ok := udp.ParseHostInfo(a.BackendData); ok {
		return hostTulle, info.Version
	}
	if a.BackendType == "" || a.BackendType == "udp" {
		return hostFlannel, ""
	}
	return hostFlannel + " " + a.BackendType, ""
}
