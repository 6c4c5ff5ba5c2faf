// Package subnet is Tulle's control plane model, compatible with flannel:
// the network config (<prefix>/config), subnet leases (keys
// <prefix>/subnets/198.18.79.0-24 with values
// {"PublicIP":"192.0.2.1","PublicIPv6":null}), allocation, subnet.env, and
// the Manager that takes, keeps and watches this host's lease through a
// Registry (etcd: package subnet/etcd).
//
// Guarantees (tested against a real etcd in subnet/etcd):
//   - One holder per subnet: a key is only created by a transaction
//     If Version(key)==0; a host never takes a key another host holds,
//     nor a subnet a reservation holds, nor one whose key has a malformed
//     value.
//   - Flannel's acquisition order: the key holding our PublicIP, else the
//     subnet from the previous subnet.env if free, else a random pick among
//     the first 100 free subnets. Byte-compatible keys and values.
//   - No orphaned etcd leases: a lost race revokes the lease it granted;
//     renewal keeps the key's own etcd lease alive (KeepAliveOnce); moving a
//     key to a new etcd lease revokes the old one.
//   - A reservation (a key without an etcd lease) of ours is used as it is
//     and never renewed or turned into a lease.
//   - The own lease is kept: renewed RenewMargin before expiry (at most
//     TTL/2), failed renewals retried with capped backoff and shown in
//     Status. A deleted or expired own key is re-acquired for the same
//     subnet; if another host holds it, Run returns ErrLeaseLost (the daemon
//     exits non-zero), never a silent stop.
//   - Events: the first batch is the snapshot of all leases at revision R,
//     then every change after R, each exactly once, in revision order,
//     across reconnects and compactions (re-list and exact diff).
//   - Malformed keys and values written by others are skipped with a
//     warning and counted; they never crash or stop the watch.
//   - Nothing waits silently: while etcd is unreachable every failure is
//     logged with its cause ("waiting for etcd at http://127.0.0.1:2379:
//     connection refused"), retried with capped backoff, and visible in
//     Status; Start gives up after StartTimeout.
//   - Errors name their object ("acquire lease 198.18.3.0/24: txn: ...");
//     config rejections name field, value and rule ("SubnetLen 31: must be
//     at most 30") and wrap ErrInvalidConfig.
package subnet
