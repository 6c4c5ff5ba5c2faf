// Package tests holds Tulle's end-to-end scenarios: real tulled binaries in
// network namespaces (package testbed), a real etcd, real traffic. They need
// root; without it they skip with a message, and with
// TULLE_REQUIRE_ROOT_TESTS=1 (CI, `make e2e`) they fail instead.
//
// Run: sudo go test -count=1 ./tests/ (add -run Name to pick one).
package tests
