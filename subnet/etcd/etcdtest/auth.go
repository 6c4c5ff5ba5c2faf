package etcdtest

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func rootPassword(opts Options) string {
	if opts.Auth != nil && opts.Auth.RootPassword != "" {
		return opts.Auth.RootPassword
	}
	return "root-secret"
}

// tokenOptions are etcd's --auth-token and --auth-token-ttl (0: etcd's
// default) for s.opts.
func (s *Server) tokenOptions() (token string, ttl uint, err error) {
	switch s.opts.AuthToken {
	case "", "simple":
		return "simple", uint((s.opts.AuthTokenTTL + time.Second - 1) / time.Second), nil
	case "jwt":
		if s.jwtKeys == "" {
			s.jwtKeys = jwtKeys(s.t)
		}
		token = "jwt," + s.jwtKeys + ",sign-method=ES256"
		if s.opts.AuthTokenTTL > 0 {
			token += ",ttl=" + s.opts.AuthTokenTTL.String()
		}
		return token, 0, nil
	}
	return "", 0, fmt.Errorf("AuthToken %q: want simple or jwt", s.opts.AuthToken)
}

// jwtKeys writes a fresh ES256 key pair and returns etcd's options naming
// it: "pub-key=...,priv-key=...".
func jwtKeys(t testing.TB) string {
	// etcd splits its token options at commas, which test names (and so
	// t.TempDir) may contain.
	dir, err := os.MkdirTemp("", "etcdtest-jwt")
	if err != nil {
		t.Fatalf("etcdtest: JWT key directory: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	k := newKey(t)
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatalf("etcdtest: JWT key: %v", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatalf("etcdtest: JWT key: %v", err)
	}
	priv, pub := filepath.Join(dir, "jwt.key"), filepath.Join(dir, "jwt.pub")
	writePEM(t, priv, "EC PRIVATE KEY", der)
	writePEM(t, pub, "PUBLIC KEY", pubDER)
	return "pub-key=" + pub + ",priv-key=" + priv
}

// enableAuth creates root and the users with their roles, then turns
// authentication on. It runs on a fresh server (s.mu held).
func (s *Server) enableAuth() error {
	return enableAuth(s.opts, []string{s.Endpoint()})
}

func enableAuth(opts Options, endpoints []string) error {
	c, err := newClient(opts, endpoints, false)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.UserAdd(ctx, "root", rootPassword(opts)); err != nil {
		return fmt.Errorf("add root: %w", err)
	}
	if _, err := c.UserGrantRole(ctx, "root", "root"); err != nil {
		return fmt.Errorf("grant root: %w", err)
	}
	for _, u := range opts.Auth.Users {
		if _, err := c.UserAdd(ctx, u.Name, u.Password); err != nil {
			return fmt.Errorf("add user %s: %w", u.Name, err)
		}
		if _, err := c.RoleAdd(ctx, u.Name); err != nil {
			return fmt.Errorf("add role %s: %w", u.Name, err)
		}
		grant := func(prefix string, typ clientv3.PermissionType) error {
			_, err := c.RoleGrantPermission(ctx, u.Name, prefix, clientv3.GetPrefixRangeEnd(prefix), typ)
			return err
		}
		for _, p := range u.ReadWrite {
			if err := grant(p, clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
				return fmt.Errorf("grant %s readwrite on %s: %w", u.Name, p, err)
			}
		}
		for _, p := range u.Read {
			if err := grant(p, clientv3.PermissionType(clientv3.PermRead)); err != nil {
				return fmt.Errorf("grant %s read on %s: %w", u.Name, p, err)
			}
		}
		if _, err := c.UserGrantRole(ctx, u.Name, u.Name); err != nil {
			return fmt.Errorf("grant role %s: %w", u.Name, err)
		}
	}
	if _, err := c.AuthEnable(ctx); err != nil {
		return fmt.Errorf("auth enable: %w", err)
	}
	return nil
}
