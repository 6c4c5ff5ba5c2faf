// Package tullecni is the CNI plugin that gives a container an address in
// this host's Tulle lease: it reads tulled's subnet.env and delegates to a
// main plugin (bridge with host-local IPAM by default) exactly as flannel's
// CNI plugin does, so flannel network configs move over by changing "type".
package tullecni

import (
	"encoding/json"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/tulle-net/tulle/subnet"
)

// Defaults of the network config fields.
const (
	// DefaultSubnetFile is where tulled (and flanneld) write the lease.
	DefaultSubnetFile = subnet.DefaultEnvFile
	// DefaultDataDir holds one saved delegate config per attachment, so DEL
	// works without subnet.env and with the config ADD used.
	DefaultDataDir = "/var/lib/cni/tulle"
	// DefaultDelegateType is the main plugin the delegate config is for.
	DefaultDelegateType = "bridge"
	// DefaultIPAMType is the IPAM plugin when ipam.type is not given.
	DefaultIPAMType = "host-local"
)

// NetConf is the network config of a tulle-cni plugin, e.g.
//
//	{"cniVersion":"1.0.0","name":"tulle","type":"tulle-cni",
//	 "delegate":{"bridge":"cni0","hairpinMode":true,"isDefaultGateway":true}}
//
// Field names are flannel's, so a flannel config only needs a new "type".
type NetConf struct {
	types.PluginConf

	// IPAM replaces types.PluginConf's IPAM, which keeps only "type": every
	// other key is passed on to the IPAM plugin. ranges and routes are
	// filled in from subnet.env.
	IPAM map[string]any `json:"ipam,omitempty"`
	// SubnetFile is tulled's subnet.env; DefaultSubnetFile when empty.
	SubnetFile string `json:"subnetFile,omitempty"`
	// DataDir holds the saved delegate configs; DefaultDataDir when empty.
	DataDir string `json:"dataDir,omitempty"`
	// Delegate is the main plugin's config; keys given here win over the
	// values derived from subnet.env (except name, cniVersion and ipam).
	Delegate map[string]any `json:"delegate,omitempty"`
	// RuntimeConfig (from the runtime's capability args) is passed on.
	RuntimeConfig map[string]any `json:"runtimeConfig,omitempty"`
}

// ParseNetConf decodes a network config from stdin, applies the defaults
// and checks what can be checked without subnet.env.
func ParseNetConf(stdin []byte) (*NetConf, error) {
	n := &NetConf{}
	if err := json.Unmarshal(stdin, n); err != nil {
		return nil, fmt.Errorf("parse network config: %w", err)
	}
	if n.Name == "" {
		return nil, fmt.Errorf("network config: name is missing")
	}
	if n.SubnetFile == "" {
		n.SubnetFile = DefaultSubnetFile
	}
	if n.DataDir == "" {
		n.DataDir = DefaultDataDir
	}
	if n.Delegate == nil {
		n.Delegate = map[string]any{}
	}
	if t, ok := n.Delegate["type"]; ok {
		if s, ok := t.(string); !ok || s == "" {
			return nil, fmt.Errorf("network config %q: delegate.type %v: must be a plugin name", n.Name, t)
		}
	}
	if _, ok := n.Delegate["ipam"]; ok {
		return nil, fmt.Errorf("network config %q: delegate.ipam: set \"ipam\" at the top level; tulle-cni builds the delegate's ipam from it and subnet.env", n.Name)
	}
	// Addresses come from the lease. A key that host-local would turn into
	// a second range (or that flannel silently ignored) is an error here,
	// so nobody believes a setting that does nothing.
	for _, k := range []string{"ranges", "subnet", "rangeStart", "rangeEnd", "gateway"} {
		if _, ok := n.IPAM[k]; ok {
			return nil, fmt.Errorf("network config %q: ipam.%s: not allowed; tulle-cni sets the range from the lease in %s", n.Name, k, n.SubnetFile)
		}
	}
	if t, ok := n.IPAM["type"]; ok {
		if s, ok := t.(string); !ok || s == "" {
			return nil, fmt.Errorf("network config %q: ipam.type %v: must be a plugin name", n.Name, t)
		}
	}
	return n, nil
}

// DelegateType is the main plugin this config delegates to.
func (n *NetConf) DelegateType() string {
	if s, ok := n.Delegate["type"].(string); ok && s != "" {
		return s
	}
	return DefaultDelegateType
}
