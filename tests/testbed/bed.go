// Package testbed builds Tulle's end-to-end test network out of Linux network
// namespaces, as the project's TESTING.md describes it:
//
//	[ns switch]  bridge (no address)
//	   |  veth      |  veth       |  veth
//	[ns etcd]    [ns host1]    [ns host2] ...
//	192.0.2.250  192.0.2.1     192.0.2.2       (underlay, MTU 1500 unless set)
//	etcd :2379   tulled        tulled
//	             bridge FLANNEL_SUBNET (198.18.1.1/24), MTU FLANNEL_MTU
//	               |  veth
//	             [ns container1] 198.18.1.2/24, default route via .1
//
// etcd is a real server (package tests/etcdserver, go.etcd.io/etcd/server/v3/embed
// in its own binary) and each host runs the real tulled binary, both under
// `ip netns exec`. Everything a Bed creates carries a per-run prefix
// ("tl<pid><letters>") and is removed by Close, also after a failure; a later
// run removes what a killed run left behind (namespaces and directories whose
// process no longer exists).
//
// The package is used by the tests in package tests, by the demo
// (go run ./tests/demo) and by the benchmark. It needs root; tests call
// RequireRoot (NewT does) so that a root-less `go test ./...` skips them with
// a clear message, and TULLE_REQUIRE_ROOT_TESTS=1 turns the skip into a failure.
//
// Addresses come only from the documentation and benchmarking ranges:
// underlay 192.0.2.0/24, overlay 198.18.0.0/15, and for IPv6 2001:db8::/32
// (ipv6.go: overlay 2001:db8:1::/48, underlay 2001:db8:ffff::/64).
package testbed

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/tests/testcert"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Underlay addressing of a bed.
var (
	// UnderlayPrefix is the underlay network every node is on.
	UnderlayPrefix = netip.MustParsePrefix("192.0.2.0/24")
	// EtcdAddr is the etcd node's underlay address.
	EtcdAddr = netip.MustParseAddr("192.0.2.250")
)

// EtcdEndpoint is the client URL of the bed's (first) etcd member, plain
// http unless EtcdOptions.TLS; EtcdEndpoints lists all.
const EtcdEndpoint = "http://192.0.2.250:2379"

// DefaultNetworkConfig is the network config the demo and most tests write:
// flannel's JSON for a /16 overlay of /24 leases with the udp backend.
const DefaultNetworkConfig = `{"Network":"198.18.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}`

const (
	defaultHosts   = 3
	maxHosts       = 199 // hosts are 192.0.2.1 .. 192.0.2.199
	maxExtraNodes  = 49  // extra nodes are 192.0.2.201 .. 192.0.2.249
	defaultMTU     = 1500
	commandTimeout = 30 * time.Second
)

// Options shape a Bed. The zero value is a bed of 3 hosts with etcd.
type Options struct {
	// Hosts is the number of hosts, 192.0.2.1 .. 192.0.2.<Hosts>
	// (0 means 3; at most 199).
	Hosts int
	// HostMTU sets the underlay MTU of a host's link (both veth ends), by
	// host index (1-based); hosts not listed get 1500.
	HostMTU map[int]int
	// NoEtcd leaves out the etcd namespace and server.
	NoEtcd bool
	// Etcd shapes the etcd server: another executable (Debian's etcd),
	// authentication (see EtcdOptions in etcd.go).
	Etcd EtcdOptions
	// Logf receives progress lines ("etcd ready on ..."); nil is silent.
	Logf func(format string, args ...any)
}

// Node is one network namespace of the bed with one link and one address:
// the etcd node, a host, a container or an extra node.
type Node struct {
	Name string     // role in the bed: "etcd", "h1", "c1", "n1"
	NS   string     // network namespace name (under /run/netns)
	Link string     // its link (the underlay veth; a container's veth)
	Addr netip.Addr // the address on Link
	MTU  int        // MTU of Link
	// Addr6 is the node's IPv6 address on Link, zero if it has none: a
	// container's in a dual-stack network, a host's IPv6 underlay address
	// (see ipv6.go).
	Addr6 netip.Addr

	bed *Bed
}

// Host is a node that runs tulled and has a container behind a bridge.
type Host struct {
	Node
	Index      int    // 1-based; the underlay address is 192.0.2.<Index>
	Dir        string // per-host directory: subnet.env, tulled.log
	SubnetFile string // --subnet-file given to tulled
	LogFile    string // tulled's standard output and error, all runs appended

	mu        sync.Mutex
	tulled    *Tulled
	container *Container
}

// Bed is a running testbed. Its methods are safe for concurrent use.
type Bed struct {
	Prefix   string  // per-run name prefix of every namespace and link
	Dir      string  // the bed's directory (removed by Close)
	SwitchNS string  // namespace of the switch bridge
	Etcd     *Node   // the etcd node; nil with Options.NoEtcd
	Hosts    []*Host // hosts in index order; AddHost appends (use Host(i) when hosts are added concurrently)

	logf func(format string, args ...any)

	mu          sync.Mutex
	cleanups    []cleanup // run in reverse order by Close
	procs       map[*proc]struct{}
	extra       int // extra nodes added so far
	etcdOpts    EtcdOptions
	etcdMembers []*etcdMember   // see etcd.go
	etcdTLS     *testcert.Files // with EtcdOptions.TLS
	etcdAuth    bool            // authentication is on (the client logs in as root)
	client      *clientv3.Client
	closed      bool
	closeErr    error
	closeOnce   sync.Once
	wg          sync.WaitGroup // process waiters
}

type cleanup struct {
	what string
	fn   func() error
}

var bedSeq atomic.Uint64

// newPrefix returns "tl<pid><letters>": unique per process and bed, short
// enough that prefix + a 4-character suffix fits a 15-character link name.
func newPrefix() string {
	n := bedSeq.Add(1) - 1
	letters := ""
	for {
		letters = string(rune('a'+n%26)) + letters
		n /= 26
		if n == 0 {
			break
		}
		n--
	}
	return fmt.Sprintf("tl%d%s", os.Getpid(), letters)
}

// New builds a bed: the switch, the etcd node with a running etcd server
// (unless opts.NoEtcd), and opts.Hosts hosts with ip_forward on. It does not
// start tulled (see Host.StartTulled and Bed.StartAll) and writes no network
// config (see Bed.WriteNetworkConfig). On error everything created so far is
// removed. The caller must Close the bed.
func New(ctx context.Context, opts Options) (*Bed, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("testbed: needs root (network namespaces, veth, TUN devices)")
	}
	sweepStaleOnce.Do(func() { sweepStale(opts.Logf) })
	hosts := opts.Hosts
	if hosts == 0 {
		hosts = defaultHosts
	}
	if hosts < 0 || hosts > maxHosts {
		return nil, fmt.Errorf("testbed: Options.Hosts %d: want 1..%d", opts.Hosts, maxHosts)
	}
	for i, mtu := range opts.HostMTU {
		if i < 1 || i > hosts || mtu < 576 || mtu > 9000 {
			return nil, fmt.Errorf("testbed: Options.HostMTU[%d] = %d: want a host index 1..%d and an MTU 576..9000", i, mtu, hosts)
		}
	}
	root, err := processDir()
	if err != nil {
		return nil, err
	}
	b := &Bed{
		Prefix:   newPrefix(),
		logf:     opts.Logf,
		procs:    map[*proc]struct{}{},
		etcdOpts: opts.Etcd,
	}
	if b.logf == nil {
		b.logf = func(string, ...any) {}
	}
	b.Dir = filepath.Join(root, b.Prefix)
	if err := os.MkdirAll(b.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	b.onClose("remove "+b.Dir, func() error { return os.RemoveAll(b.Dir) })

	if err := b.build(ctx, hosts, opts); err != nil {
		return nil, errors.Join(err, b.Close())
	}
	return b, nil
}

func (b *Bed) build(ctx context.Context, hosts int, opts Options) error {
	b.SwitchNS = b.Prefix + "-sw"
	if err := b.addNetns(ctx, b.SwitchNS); err != nil {
		return err
	}
	br := b.Prefix + "br"
	if err := ipCmd(ctx, "-n", b.SwitchNS, "link", "add", br, "type", "bridge"); err != nil {
		return err
	}
	if err := ipCmd(ctx, "-n", b.SwitchNS, "link", "set", br, "up"); err != nil {
		return err
	}
	if !opts.NoEtcd {
		if err := b.buildEtcd(ctx); err != nil {
			return err
		}
	}
	for i := 1; i <= hosts; i++ {
		if _, err := b.AddHost(ctx, opts.HostMTU[i]); err != nil {
			return err
		}
	}
	etcdAt := ""
	if !opts.NoEtcd {
		etcdAt = ", etcd at " + strings.Join(b.EtcdEndpoints(), ",")
	}
	b.logf("testbed %s: switch, %d hosts%s", b.Prefix, hosts, etcdAt)
	return nil
}

// addNetns creates namespace name with lo up and schedules its deletion.
func (b *Bed) addNetns(ctx context.Context, name string) error {
	if err := ipCmd(ctx, "netns", "add", name); err != nil {
		return fmt.Errorf("testbed: create namespace: %w", err)
	}
	b.onClose("delete netns "+name, func() error {
		if _, err := os.Stat(filepath.Join("/run/netns", name)); errors.Is(err, os.ErrNotExist) {
			return nil // deleted already (a replaced container)
		}
		ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
		defer cancel()
		return ipCmd(ctx, "netns", "del", name)
	})
	return ipCmd(ctx, "-n", name, "link", "set", "lo", "up")
}

// attach creates namespace ns with a veth link to the switch, the address
// addr/24 and the MTU on both ends.
func (b *Bed) attach(ctx context.Context, role, ns, link, port string, addr netip.Addr, mtu int) (*Node, error) {
	if mtu == 0 {
		mtu = defaultMTU
	}
	if err := b.addNetns(ctx, ns); err != nil {
		return nil, err
	}
	m := strconv.Itoa(mtu)
	steps := [][]string{
		{"-n", ns, "link", "add", link, "mtu", m, "type", "veth", "peer", "name", port, "mtu", m, "netns", b.SwitchNS},
		{"-n", b.SwitchNS, "link", "set", port, "master", b.Prefix + "br", "up"},
		{"-n", ns, "addr", "add", netip.PrefixFrom(addr, UnderlayPrefix.Bits()).String(), "dev", link},
		{"-n", ns, "link", "set", link, "up"},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			return nil, fmt.Errorf("testbed: attach %s to the switch: %w", role, err)
		}
	}
	return &Node{Name: role, NS: ns, Link: link, Addr: addr, MTU: mtu, bed: b}, nil
}

// AddHost adds a host with the next index (192.0.2.<index>) and the given
// underlay MTU (0 = 1500), with ip_forward on. tulled is not started.
func (b *Bed) AddHost(ctx context.Context, mtu int) (*Host, error) {
	b.mu.Lock()
	idx := len(b.Hosts) + 1
	b.mu.Unlock()
	if idx > maxHosts {
		return nil, fmt.Errorf("testbed: at most %d hosts", maxHosts)
	}
	name := fmt.Sprintf("h%d", idx)
	addr := UnderlayPrefix.Addr().As4()
	addr[3] = byte(idx)
	n, err := b.attach(ctx, name, fmt.Sprintf("%s-h%d", b.Prefix, idx), fmt.Sprintf("%su%d", b.Prefix, idx),
		fmt.Sprintf("%ss%d", b.Prefix, idx), netip.AddrFrom4(addr), mtu)
	if err != nil {
		return nil, err
	}
	return b.addHostOn(ctx, n, idx)
}

// addHostOn makes node n, attached to a segment, the bed's host number idx:
// ip_forward on, its directory made, and one of the bed's Hosts.
func (b *Bed) addHostOn(ctx context.Context, n *Node, idx int) (*Host, error) {
	if err := setSysctl(ctx, n.NS, "net/ipv4/ip_forward", "1"); err != nil {
		return nil, fmt.Errorf("testbed: host %s: %w", n.Name, err)
	}
	h := &Host{Node: *n, Index: idx, Dir: filepath.Join(b.Dir, n.Name)}
	h.SubnetFile = filepath.Join(h.Dir, "subnet.env")
	h.LogFile = filepath.Join(h.Dir, "tulled.log")
	if err := os.MkdirAll(h.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("testbed: host %s: %w", n.Name, err)
	}
	b.mu.Lock()
	b.Hosts = append(b.Hosts, h)
	b.mu.Unlock()
	return h, nil
}

// AddNode adds a namespace on the switch that is not a host (no tulled, no
// lease unless the test writes one): a stranger, or a flannel host played
// by the test. Addresses are 192.0.2.201 upwards.
func (b *Bed) AddNode(ctx context.Context) (*Node, error) {
	b.mu.Lock()
	b.extra++
	k := b.extra
	b.mu.Unlock()
	if k > maxExtraNodes {
		return nil, fmt.Errorf("testbed: at most %d extra nodes", maxExtraNodes)
	}
	addr := UnderlayPrefix.Addr().As4()
	addr[3] = byte(200 + k)
	return b.attach(ctx, fmt.Sprintf("n%d", k), fmt.Sprintf("%s-n%d", b.Prefix, k), fmt.Sprintf("%sun%d", b.Prefix, k),
		fmt.Sprintf("%ssn%d", b.Prefix, k), netip.AddrFrom4(addr), defaultMTU)
}

// Host returns host i (1-based); it panics if there is none.
func (b *Bed) Host(i int) *Host {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i < 1 || i > len(b.Hosts) {
		panic(fmt.Sprintf("testbed: no host %d (the bed has %d)", i, len(b.Hosts)))
	}
	return b.Hosts[i-1]
}

// onClose pushes a cleanup step; Close runs them in reverse order.
func (b *Bed) onClose(what string, fn func() error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cleanups = append(b.cleanups, cleanup{what, fn})
}

// Close stops every process the bed started (SIGTERM, then SIGKILL), closes
// the etcd client, deletes every namespace (and so every link) and removes
// the bed's directory. It is idempotent and returns the joined errors of the
// steps that failed; every step is tried.
func (b *Bed) Close() error {
	b.closeOnce.Do(func() {
		var errs []error
		b.mu.Lock()
		b.closed = true
		procs := make([]*proc, 0, len(b.procs))
		for p := range b.procs {
			procs = append(procs, p)
		}
		client := b.client
		b.client = nil
		b.mu.Unlock()

		var wg sync.WaitGroup
		for _, p := range procs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.terminate(5 * time.Second)
			}()
		}
		wg.Wait()
		b.wg.Wait()
		if client != nil {
			_ = client.Close()
		}

		b.mu.Lock()
		steps := b.cleanups
		b.cleanups = nil
		b.mu.Unlock()
		for i := len(steps) - 1; i >= 0; i-- {
			if err := steps[i].fn(); err != nil {
				errs = append(errs, fmt.Errorf("testbed %s: %s: %w", b.Prefix, steps[i].what, err))
			}
		}
		b.closeErr = errors.Join(errs...)
	})
	return b.closeErr
}

var sweepStaleOnce sync.Once

// staleName matches the namespaces and directories a bed creates; the
// number is the creating process.
var staleName = regexp.MustCompile(`^tl([0-9]+)[a-z]+-`)

// sweepStale removes namespaces and process directories left by testbed
// runs whose process no longer exists (a run killed before its Close).
func sweepStale(logf func(string, ...any)) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		m := staleName.FindStringSubmatch(e.Name())
		if m == nil || processAlive(m[1]) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
		if err := ipCmd(ctx, "netns", "del", e.Name()); err == nil {
			logf("testbed: removed namespace %s left by a run that ended without cleaning up", e.Name())
		}
		cancel()
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "tulle-testbed-*"))
	for _, d := range dirs {
		pid := filepath.Base(d)[len("tulle-testbed-"):]
		if _, err := strconv.Atoi(pid); err != nil || processAlive(pid) {
			continue
		}
		if os.RemoveAll(d) == nil {
			logf("testbed: removed %s left by a run that ended without cleaning up", d)
		}
	}
}

func processAlive(pid string) bool {
	n, err := strconv.Atoi(pid)
	if err != nil || n <= 0 {
		return true // not ours to judge
	}
	err = syscall.Kill(n, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
