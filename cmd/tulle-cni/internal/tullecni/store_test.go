package tullecni

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestStoreRoundTripsTheDelegateConfig(t *testing.T) {
	s := Store{Dir: filepath.Join(t.TempDir(), "tulle")}
	conf := json.RawMessage(`{"cniVersion":"1.0.0","name":"tulle","type":"bridge","ipam":{"type":"host-local"}}`)
	in := Attachment{Network: "tulle", ContainerID: "abc-123_x.y", IfName: "eth0", Delegate: conf}
	if err := s.Save(in); err != nil {
		t.Fatal(err)
	}
	out, err := s.Load("abc-123_x.y", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if out.Network != in.Network || out.ContainerID != in.ContainerID || out.IfName != in.IfName || string(out.Delegate) != string(conf) {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
	st, err := os.Stat(filepath.Join(s.Dir, "abc-123_x.y@eth0.json"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("saved file mode %v, want 0600", st.Mode().Perm())
	}
	if err := s.Remove("abc-123_x.y", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("abc-123_x.y", "eth0"); err != nil {
		t.Errorf("second Remove: %v, want nil", err)
	}
	if _, err := s.Load("abc-123_x.y", "eth0"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after Remove: %v, want fs.ErrNotExist", err)
	}
	left, _ := os.ReadDir(s.Dir)
	if len(left) != 0 {
		t.Errorf("files left in %s: %v", s.Dir, left)
	}
}

func TestStoreKeepsInterfacesOfOneContainerApart(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	for _, ifn := range []string{"eth0", "net1"} {
		conf := json.RawMessage(`{"type":"bridge","bridge":"` + ifn + `"}`)
		if err := s.Save(Attachment{Network: "tulle", ContainerID: "c1", IfName: ifn, Delegate: conf}); err != nil {
			t.Fatal(err)
		}
	}
	a, err := s.Load("c1", "net1")
	if err != nil {
		t.Fatal(err)
	}
	if string(a.Delegate) != `{"type":"bridge","bridge":"net1"}` {
		t.Errorf("Load(c1, net1) = %s", a.Delegate)
	}
}

func TestStoreRefusesNamesThatLeaveTheDirectory(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	for _, tc := range []struct{ id, ifName string }{
		{"../../etc/x", "eth0"},
		{"c1", "../x"},
		{"", "eth0"},
		{"c1", ""},
		{"c@1", "eth0"},
	} {
		err := s.Save(Attachment{Network: "n", ContainerID: tc.id, IfName: tc.ifName, Delegate: json.RawMessage(`{}`)})
		if err == nil {
			t.Errorf("Save(%q, %q) succeeded", tc.id, tc.ifName)
		}
	}
}

func TestStoreListsOnlyTheNetworksAttachments(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	for _, a := range []Attachment{
		{Network: "tulle", ContainerID: "c1", IfName: "eth0"},
		{Network: "tulle", ContainerID: "c2", IfName: "eth0"},
		{Network: "other", ContainerID: "c3", IfName: "eth0"},
	} {
		a.Delegate = json.RawMessage(`{"type":"bridge"}`)
		if err := s.Save(a); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(s.Dir, "junk@eth0.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, errs := s.List("tulle")
	if len(got) != 2 {
		t.Errorf("List(tulle) = %d attachments, want 2: %+v", len(got), got)
	}
	if len(errs) != 1 {
		t.Errorf("List errors = %v, want one for the junk file", errs)
	}
}

func TestStoreRejectsAFileOfAnotherFormat(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	// flannel's own format: the bare delegate config.
	if err := os.WriteFile(filepath.Join(s.Dir, "c1@eth0.json"), []byte(`{"type":"bridge"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load("c1", "eth0"); err == nil {
		t.Error("Load accepted a file without the format version")
	}
}
