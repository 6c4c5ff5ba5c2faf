package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"strconv"
	"strings"

	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/subnet"
)

// dockerOptsMain is `tulled docker-opts`.
func dockerOptsMain(args, env []string, stdout, stderr io.Writer) int {
	o, action, err := config.ParseDockerOpts(args, env)
	if code, done := commandLineDone("tulled docker-opts", err, action, config.DockerOptsUsage, stdout, stderr); done {
		return code
	}
	e, err := subnet.ReadEnv(o.SubnetFile)
	if err != nil {
		hint := ""
		if errors.Is(err, fs.ErrNotExist) {
			hint = " (tulled writes it once it holds a lease; is it running, with this --subnet-file?)"
		}
		fmt.Fprintf(stderr, "tulled docker-opts: %v%s\n", err, hint)
		return ExitFailure
	}
	if !e.Subnet.IsValid() {
		fmt.Fprintf(stderr, "tulled docker-opts: %s has no IPv4 FLANNEL_SUBNET for Docker's --bip\n", o.SubnetFile)
		return ExitFailure
	}
	var out []byte
	if o.DaemonJSON {
		out = formatDaemonJSON(e, o.NoIPMasq)
	} else {
		out = formatDockerOpts(e, *o, envValue(env, o.Key))
	}
	if o.OutFile == "" {
		_, err = stdout.Write(out)
	} else if err = subnet.WriteFileAtomic(o.OutFile, out, 0o644); err != nil {
		err = fmt.Errorf("write %s: %w", o.OutFile, err)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tulled docker-opts: %v\n", err)
		return ExitFailure
	}
	return ExitOK
}

// envValue is key's value in env (os.Environ format); the last one wins.
func envValue(env []string, key string) string {
	value := ""
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			value = v
		}
	}
	return value
}

// dockerBIP is Docker's --bip for a lease (FLANNEL_SUBNET as flannel
// writes it).
func dockerBIP(lease netip.Prefix) string { return subnet.FirstHost(lease).String() }

// formatDockerOpts prints what flannel's mk-docker-opts.sh writes:
//
//	DOCKER_OPT_BIP="--bip=198.18.79.1/24"
//	DOCKER_OPT_IPMASQ="--ip-masq=false"
//	DOCKER_OPT_MTU="--mtu=1472"
//	DOCKER_OPTS=" --bip=198.18.79.1/24 --ip-masq=false --mtu=1472"
//
// and, in a dual-stack network (FLANNEL_IPV6_SUBNET), between IPMASQ and
// MTU: DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=2001:db8:1:4f::/64" (the
// IPv6 lease, for Docker's containers).
//
// The individual lines come in the script's (alphabetical) order; the
// combined value starts with the variable's current value from the
// environment, if any, as the script's does; --ip-masq is the opposite of
// FLANNEL_IPMASQ (whoever masquerades, Docker must not do it twice).
// current is the variable's value in the environment.
func formatDockerOpts(e subnet.Env, o config.DockerOpts, current string) []byte {
	type opt struct{ name, value string }
	opts := []opt{{"DOCKER_OPT_BIP", "--bip=" + dockerBIP(e.Subnet)}}
	if !o.NoIPMasq {
		opts = append(opts, opt{"DOCKER_OPT_IPMASQ", "--ip-masq=" + strconv.FormatBool(!e.IPMasq)})
	}
	if e.IPv6Subnet.IsValid() {
		opts = append(opts, opt{"DOCKER_OPT_IPV6", "--ipv6 --fixed-cidr-v6=" + e.IPv6Subnet.Masked().String()})
	}
	if e.MTU > 0 {
		opts = append(opts, opt{"DOCKER_OPT_MTU", "--mtu=" + strconv.Itoa(e.MTU)})
	}
	combined := current
	if combined != "" {
		combined += " "
	}
	var b bytes.Buffer
	for _, op := range opts {
		if o.Individual {
			fmt.Fprintf(&b, "%s=\"%s\"\n", op.name, op.value)
		}
		combined += " " + op.value
	}
	if o.Combined {
		fmt.Fprintf(&b, "%s=\"%s\"\n", o.Key, combined)
	}
	return b.Bytes()
}

// formatDaemonJSON is a fragment of Docker's /etc/docker/daemon.json:
// {"bip": "198.18.79.1/24", "ip-masq": false, "mtu": 1472}, and in a
// dual-stack network "ipv6": true, "fixed-cidr-v6": "2001:db8:1:4f::/64".
func formatDaemonJSON(e subnet.Env, noIPMasq bool) []byte {
	frag := struct {
		BIP         string `json:"bip"`
		IPMasq      *bool  `json:"ip-masq,omitempty"`
		MTU         int    `json:"mtu,omitempty"`
		IPv6        bool   `json:"ipv6,omitempty"`
		FixedCIDRv6 string `json:"fixed-cidr-v6,omitempty"`
	}{BIP: dockerBIP(e.Subnet), MTU: e.MTU}
	if e.IPv6Subnet.IsValid() {
		frag.IPv6, frag.FixedCIDRv6 = true, e.IPv6Subnet.Masked().String()
	}
	if !noIPMasq {
		v := !e.IPMasq
		frag.IPMasq = &v
	}
	b, _ := json.MarshalIndent(frag, "", "  ")
	return append(b, '\n')
}
