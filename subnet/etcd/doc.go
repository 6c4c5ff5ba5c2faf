// Package etcd is the etcd v3 subnet.Registry, sharing flannel's layout so
// flannel and Tulle hosts can live in one etcd.
//
// Acquire: list <prefix>/subnets/, pick in flannel's order (subnet.Registry),
// create with Txn If Version(key)==0 Then Put(key, value, lease); a lost race
// revokes the granted etcd lease and retries (up to 20 times, with jitter).
//
// Renew: KeepAliveOnce on the key's own etcd lease, after checking the key
// still holds that lease and our PublicIP. Chosen over grant-new+revoke-old
// because the key is never rewritten (no event for every host at every
// renewal, no window in which the key points at a lease about to be
// revoked) and no lease is ever created that could be left behind. The cost:
// the TTL is the one granted when the key was (re-)leased, so a changed TTL
// applies from the next start, when a reused key is moved to a new etcd lease
// of the current TTL (and the old lease revoked).
//
// Watch (WatchPrefix, for any key family below the prefix; WatchLeases
// parses <prefix>/subnets/ on top of it): snapshot at revision R, then
// every change after R (WithRequireLeader, progress notifications; the
// watch itself starts at R and drops R's events again, so that etcd
// answers progress requests at once); resume from the last applied
// revision after any error, with a capped, jittered backoff (100ms..10s);
// re-list and diff after compaction. Each watch session has a gRPC stream
// of its own. clientv3 watches wait silently on a dead server, so a watch
// silent for DialTimeout is asked for progress and abandoned if etcd does
// not answer within DialTimeout more.
//
// PutKey, DeleteKey, GetKey and ListPrefix read and write other key
// families (e.g. <prefix>/policies/) with the same connection.
//
// Auth (auth.go): with a username, the registry logs in itself and
// attaches the token to every request; a token etcd rejects (restart, idle
// past --auth-token-ttl, JWT expiry) is replaced by a new login and the
// call, the watch or the keep-alive made again, at most once a second.
//
// Connection (conn.go): the gRPC connection's state is followed, so an
// etcd that goes away shows at once (a silent one after the keepalive,
// 10s+2s); while no endpoint accepts connections every call fails at once
// with the cause. Errors (errors.go): an *UnreachableError says why etcd
// does not answer; a *RefusedError (subnet.ErrRefused) says what etcd
// refused and why: a password, a permission on a key, a certificate.
//
// New does not contact etcd; the client is created on first use. TLS:
// CAFile, CertFile, KeyFile (refused with plain http:// endpoints).
package etcd
