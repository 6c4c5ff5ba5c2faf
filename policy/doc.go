// Package policy is Tulle's network policy: which workloads (container
// addresses) may talk to which, in which direction, on which protocols and
// ports, with Calico's and Kubernetes' meaning, enforced by the kernel's
// nftables.
//
// The model: a Policy is a JSON document at <prefix>/policies/<name>; a
// Netset, a named list of address prefixes, at <prefix>/netsets/<name>.
// ParsePolicy and ParseNetset read them strictly (unknown fields, bad
// prefixes, ports without a protocol are errors that name the field);
// ParseDocuments reads the files `tulled policy apply` takes.
//
// The meaning (see decide.go, the reference the compiler is tested against):
// a workload selected by at least one policy with an Ingress list is
// default-deny for ingress; the policies selecting it are taken by Order
// (absent: after all others), then name; their rules in order; the first rule
// that matches decides; none matching denies. Egress likewise. Workloads no
// policy selects are unaffected. Replies of allowed connections pass
// (connection tracking). A host enforces for its own workloads only (the
// addresses in its own leases): egress as traffic leaves them, ingress as it
// reaches them. Traffic of the host itself is not filtered.
//
// Enforcement: Compile turns policies, netsets, leases and the host's own
// subnets into one Ruleset, and an Enforcer installs it as the inet table
// "tulle" in one netlink transaction (github.com/google/nftables), so the
// kernel never runs a half-applied ruleset, and reads its counters back.
//
// Why the inet forward hook: a workload's traffic to another host (over the
// overlay or a direct route) is routed, so it passes the forward hook; the
// traffic between two containers on the same bridge is bridged, and reaches
// the inet forward hook, with connection tracking, through br_netfilter
// (net.bridge.bridge-nf-call-iptables and -ip6tables, which Docker and
// Kubernetes turn on). A "bridge" family table would see bridged frames
// without br_netfilter, but it has connection tracking only with
// nf_conntrack_bridge, which many kernels (this project's CI among them) do
// not have, and stateless filtering cannot let replies through without
// opening ports. Traffic of the host itself takes the input and output hooks
// and so is not filtered, as the model wants.
//
// The package knows nothing of TUN devices or the data plane: the daemon
// passes it leases and the documents it reads from etcd.
package policy
