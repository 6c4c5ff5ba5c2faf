// Command etcdserver is a one-member etcd server for Tulle's end-to-end tests,
// demo and benchmark: go.etcd.io/etcd/server/v3/embed in a small binary that
// the testbed runs under `ip netns exec` in the testbed's etcd namespace.
//
// It keeps its state in --data-dir, so it can be stopped (SIGTERM) and
// started again on the same directory to test an etcd outage. It prints the
// line "ready" on standard output once it serves clients; logs go to
// standard error.
//
// The etcd server lives here, never in the daemon: tulled stays lean.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "etcdserver:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		dataDir  = flag.String("data-dir", "", "directory of the member's data (required)")
		client   = flag.String("listen-client", "http://127.0.0.1:2379", "client `URL` to listen on and advertise")
		peer     = flag.String("listen-peer", "http://127.0.0.1:2380", "peer `URL` to listen on and advertise")
		name     = flag.String("name", "tulle-test", "member `name`")
		logLevel = flag.String("log-level", "error", "etcd log `level`")
		timeout  = flag.Duration("start-timeout", 60*time.Second, "give up when the server is not ready after this `long`")
		tokenTTL = flag.Uint("auth-token-ttl", 300, "`seconds` an unused simple auth token lives (as etcd's flag)")
		cluster  = flag.String("initial-cluster", "", "`name=peerURL,...` of every member of a new cluster (default: this member alone)")
		tick     = flag.Uint("heartbeat-interval", 100, "raft heartbeat in `ms` (as etcd's flag)")
		election = flag.Uint("election-timeout", 1000, "raft election timeout in `ms` (as etcd's flag)")
		certFile = flag.String("cert-file", "", "serve clients over TLS with this certificate `file` (as etcd's flag)")
		keyFile  = flag.String("key-file", "", "its key `file`")
		caFile   = flag.String("trusted-ca-file", "", "CA `file` of the client certificates")
		certAuth = flag.Bool("client-cert-auth", false, "require a client certificate signed by --trusted-ca-file")
	)
	flag.Parse()
	if *dataDir == "" {
		return fmt.Errorf("--data-dir is required")
	}
	clientURL, err := url.Parse(*client)
	if err != nil {
		return fmt.Errorf("--listen-client %q: %w", *client, err)
	}
	peerURL, err := url.Parse(*peer)
	if err != nil {
		return fmt.Errorf("--listen-peer %q: %w", *peer, err)
	}

	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = []url.URL{*peerURL}
	cfg.AdvertisePeerUrls = []url.URL{*peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	if *cluster != "" {
		cfg.InitialCluster = *cluster
	}
	cfg.TickMs, cfg.ElectionMs = *tick, *election
	if *certFile != "" {
		cfg.ClientTLSInfo = transport.TLSInfo{CertFile: *certFile, KeyFile: *keyFile, TrustedCAFile: *caFile, ClientCertAuth: *certAuth}
	}
	cfg.LogLevel = *logLevel
	cfg.LogOutputs = []string{"stderr"}
	// Tests restart the server on purpose and never need durability across
	// a machine crash; fsync on a shared test disk only costs time.
	cfg.UnsafeNoFsync = true
	cfg.AuthTokenTTL = *tokenTTL
	cfg.BcryptCost = 4 // bcrypt's minimum: test passwords are checked fast

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start etcd in %s on %s: %w", *dataDir, *client, err)
	}
	defer e.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	select {
	case <-e.Server.ReadyNotify():
		fmt.Println("ready")
	case <-time.After(*timeout):
		e.Server.Stop()
		return fmt.Errorf("etcd on %s not ready after %v", *client, *timeout)
	case <-ctx.Done():
		return nil
	}
	select {
	case err := <-e.Err():
		return fmt.Errorf("etcd on %s: %w", *client, err)
	case <-ctx.Done():
		return nil
	}
}
