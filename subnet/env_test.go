package subnet

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteEnvIsFlannelsFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "flannel", "subnet.env")
	e := Env{Network: netip.MustParsePrefix("198.18.0.0/16"), Subnet: netip.MustParsePrefix("198.18.79.0/24"), MTU: 1472, IPMasq: true}
	if err := WriteEnv(path, e); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.79.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
	if string(b) != want {
		t.Errorf("got\n%s\nwant\n%s", b, want)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644", fi.Mode().Perm())
	}
	back, err := ReadEnv(path)
	if err != nil || back != e {
		t.Errorf("ReadEnv = %+v %v, want %+v", back, err, e)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
}

func TestWriteEnvDualStack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "subnet.env")
	e := Env{Network: netip.MustParsePrefix("198.18.0.0/16"), Subnet: netip.MustParsePrefix("198.18.79.0/24"), MTU: 1472,
		IPv6Network: netip.MustParsePrefix("2001:db8::/48"), IPv6Subnet: netip.MustParsePrefix("2001:db8:0:4f::/64")}
	if err := WriteEnv(path, e); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	want := "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.79.1/24\nFLANNEL_IPV6_NETWORK=2001:db8::/48\nFLANNEL_IPV6_SUBNET=2001:db8:0:4f::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
	if string(b) != want {
		t.Errorf("got\n%s\nwant\n%s", b, want)
	}
	if back, err := ReadEnv(path); err != nil || back != e {
		t.Errorf("ReadEnv = %+v %v", back, err)
	}
}

func TestReadEnvReportsCorruptAndMissingFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadEnv(filepath.Join(dir, "none")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v, want fs.ErrNotExist", err)
	}
	for content, want := range map[string]string{
		"":                                  "no FLANNEL_SUBNET",
		"FLANNEL_SUBNET=198.18.79.1/24\nxx": `line 2: "xx": want NAME=value`,
		"FLANNEL_SUBNET=banana":             "line 1: FLANNEL_SUBNET=banana",
		"FLANNEL_SUBNET=198.18.79.1/24\nFLANNEL_MTU=-1": "line 2: FLANNEL_MTU=-1: must be between 1 and 65535",
		"FLANNEL_SUBNET=2001:db8::1/64":                 "not an IPv4 prefix",
	} {
		p := filepath.Join(dir, "subnet.env")
		os.WriteFile(p, []byte(content), 0o644)
		_, err := ReadEnv(p)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), p) {
			t.Errorf("ReadEnv(%q) = %v, want an error naming the file and %q", content, err, want)
		}
	}
}

func TestReadEnvAcceptsFlannelWrittenFiles(t *testing.T) {
	e, err := ParseEnv([]byte("# written by flanneld\nFLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=\"198.18.79.1/24\"\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\nOTHER=1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if e.Subnet != netip.MustParsePrefix("198.18.79.0/24") || e.MTU != 1472 {
		t.Errorf("got %+v", e)
	}
}

func TestWriteFileAtomicReplacesWithModeAndLeavesNoTemporaryFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(path, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	st, serr := os.Stat(path)
	if err != nil || serr != nil || string(b) != "new" || st.Mode().Perm() != 0o600 {
		t.Fatalf("content %q (%v), mode %v (%v); want \"new\", 0600", b, err, st.Mode().Perm(), serr)
	}
	// A failing rename (the target is a non-empty directory) leaves no
	// temporary file behind.
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "d", "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(filepath.Join(dir, "d"), []byte("x"), 0o644); err == nil {
		t.Fatal("replacing a non-empty directory succeeded")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("directory holds %v after a failed write, want only f and d", entries)
	}
}
