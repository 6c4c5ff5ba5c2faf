package etcd

import (
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	tulleUser     = "tulle"
	tullePassword = "tulle-secret"
)

// startAuthEtcd starts etcd with authentication on: root, and the user
// tulle with read-write permission on the test's prefix only. It writes the
// network config there and returns the server, a root client and the prefix.
func startAuthEtcd(t *testing.T, opts etcdtest.Options) (*etcdtest.Server, *clientv3.Client, string) {
	t.Helper()
	prefix := testPrefix(t)
	opts.Auth = &etcdtest.Auth{Users: []etcdtest.User{{Name: tulleUser, Password: tullePassword, ReadWrite: []string{prefix + "/"}}}}
	s := etcdtest.New(t, opts)
	s.Start()
	c := s.Client()
	putConfig(t, c, prefix, `{"Network":"198.18.0.0/16"}`)
	return s, c, prefix
}

// newAuthRegistry is newRegistry as the user tulle.
func newAuthRegistry(t *testing.T, cfg Config) *Registry {
	t.Helper()
	lg, _ := testLogger(t)
	cfg.Username, cfg.Password = tulleUser, tullePassword
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = time.Second
	}
	r, err := New(cfg, lg)
	if err != nil {
		t.Fatal(err)
	}
	r.backoffMax = 2 * time.Second
	t.Cleanup(func() { r.Close() })
	return r
}

// TestAuthTokenLossIsRecoveredByTheRunningWatchAndRenewal: whatever makes
// the token the client holds invalid (an etcd restart forgets simple
// tokens; a simple token idle past --auth-token-ttl is dropped; a JWT runs
// out), a lease created afterwards reaches the running watch within 5s and
// the own lease is renewed, without a restart of the registry.
func TestAuthTokenLossIsRecoveredByTheRunningWatchAndRenewal(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		opts    etcdtest.Options
		restart bool
		etcd34  bool // Debian's etcd 3.4 executable, as operators run it
	}{
		{"simple token, etcd restarted after writes", etcdtest.Options{AuthToken: "simple"}, true, false},
		{"simple token idle past auth-token-ttl", etcdtest.Options{AuthToken: "simple", AuthTokenTTL: 2 * time.Second}, false, false},
		{"JWT past its ttl", etcdtest.Options{AuthToken: "jwt", AuthTokenTTL: 2 * time.Second}, false, false},
		{"etcd 3.4, simple token, etcd restarted after writes", etcdtest.Options{AuthToken: "simple"}, true, true},
		{"etcd 3.4, simple token idle past auth-token-ttl", etcdtest.Options{AuthToken: "simple", AuthTokenTTL: 2 * time.Second}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.etcd34 {
				tc.opts.Binary = etcdtest.Executable(t)
			}
			s, c, prefix := startAuthEtcd(t, tc.opts)
			r := newAuthRegistry(t, Config{Endpoints: []string{s.Endpoint()}, Prefix: prefix})
			// Renewals every 4s: a token that lives 2s is stale at each.
			const ttl = 8 * time.Second
			m, _, own := startManager(t, r, subnet.ManagerOptions{LeaseTTL: ttl})
			w, done := runManager(t, m)
			eventually(t, 10*time.Second, "snapshot", func() bool { return w.nbatches() >= 1 })

			// A third host comes and goes: ordinary writes.
			putLease(t, c, prefix, "198.18.201.0-24", otherValue(201), 60)
			eventually(t, 5*time.Second, "the third host's lease", func() bool { return w.count(subnet.EventAdded, "198.18.201.0/24") == 1 })
			if _, err := c.Delete(ctx(t), prefix+"/subnets/198.18.201.0-24"); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "the third host's lease removed", func() bool { return w.count(subnet.EventRemoved, "198.18.201.0/24") == 1 })

			if tc.restart {
				s.Restart()
			} else {
				// Idle past the token's lifetime, with renewals in between.
				time.Sleep(2*tc.opts.AuthTokenTTL + time.Second)
			}
			c = s.Client() // the test's own clientv3 cannot renew its token on etcd 3.4
			after := time.Now()
			putLease(t, c, prefix, "198.18.202.0-24", otherValue(202), 60)
			eventually(t, 5*time.Second, "a lease created afterwards to reach the watch", func() bool {
				return w.count(subnet.EventAdded, "198.18.202.0/24") == 1
			})
			t.Logf("the new lease arrived %s after it was written", time.Since(after).Round(time.Millisecond))
			eventually(t, ttl, "a renewal after that", func() bool {
				st := m.Status()
				return st.LeaseHeld && st.Lease.LeaseID == own.LeaseID && st.Lease.Expiration.After(after.Add(ttl/2))
			})
			if kv := getKV(t, c, prefix+"/subnets/"+own.Key()); len(kv.Kvs) != 1 || kv.Kvs[0].Lease != own.LeaseID {
				t.Errorf("own key %+v, want it on etcd lease %x", kv.Kvs, own.LeaseID)
			}
			w.wantAddedOnce(t, own.Subnet.String(), "198.18.201.0/24", "198.18.202.0/24")
			wantRunning(t, done)
		})
	}
}

// TestWatchStartedAfterTheTokenExpiredGetsAFreshStream: clientv3 puts every
// watch with the same metadata on one gRPC stream, which carries the token
// it was opened with. A watch started after that token expired, while
// another keeps the stream open, would be refused on it for good.
func TestWatchStartedAfterTheTokenExpiredGetsAFreshStream(t *testing.T) {
	t.Parallel()
	const tokenTTL = 2 * time.Second
	s, c, prefix := startAuthEtcd(t, etcdtest.Options{AuthToken: "simple", AuthTokenTTL: tokenTTL})
	r := newAuthRegistry(t, Config{Endpoints: []string{s.Endpoint()}, Prefix: prefix})
	leases := watch(t, r)
	eventually(t, 10*time.Second, "lease snapshot", func() bool { return leases.nbatches() >= 1 })
	time.Sleep(2*tokenTTL + time.Second) // the token expires while the lease watch idles

	policies := watchPrefix(t, r, "policies/")
	put(t, c, prefix+"/policies/web", "allow 80")
	t0 := time.Now()
	eventually(t, 5*time.Second, "the policy from the watch started after the token expired", func() bool {
		return strings.Join(policies.lines(0), ", ") == "put web=allow 80"
	})
	t.Logf("the new watch delivered after %s", time.Since(t0).Round(time.Millisecond))
	putLease(t, c, prefix, "198.18.9.0-24", otherValue(9), 0)
	eventually(t, 5*time.Second, "the lease watch going on", func() bool { return leases.count(subnet.EventAdded, "198.18.9.0/24") == 1 })
}
