package tullecni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/tulle-net/tulle/subnet"
)

// recordingExec stands in for the delegate executable in these unit tests
// of tulle-cni's own logic; tests/integrations runs the real bridge and
// host-local plugins through cnitool.
type recordingExec struct {
	calls []execCall // every call but VERSION
	fail  error
	// versions answers VERSION; nil: those of Debian 12's plugins.
	versions []string
}

type execCall struct {
	command string
	env     []string
	conf    map[string]any
}

func (r *recordingExec) ExecPlugin(_ context.Context, _ string, stdin []byte, environ []string) ([]byte, error) {
	var c execCall
	if err := json.Unmarshal(stdin, &c.conf); err != nil {
		return nil, err
	}
	c.env = environ
	for _, e := range environ {
		if v, ok := strings.CutPrefix(e, "CNI_COMMAND="); ok {
			c.command = v
		}
	}
	if c.command == "VERSION" {
		vs := r.versions
		if vs == nil {
			vs = []string{"0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"}
		}
		return json.Marshal(map[string]any{"cniVersion": "1.0.0", "supportedVersions": vs})
	}
	r.calls = append(r.calls, c)
	if r.fail != nil {
		return nil, r.fail
	}
	if c.command == "ADD" {
		return []byte(`{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],
			"ips":[{"interface":0,"address":"198.18.79.2/24","gateway":"198.18.79.1"}]}`), nil
	}
	return nil, nil
}

func (r *recordingExec) FindInPath(plugin string, _ []string) (string, error) {
	return "/opt/cni/bin/" + plugin, nil
}

func (r *recordingExec) Decode(b []byte) (version.PluginInfo, error) {
	return (&version.PluginDecoder{}).Decode(b)
}

type fixture struct {
	dir, subnetFile, dataDir string
	exec                     *recordingExec
	out                      bytes.Buffer
	p                        *Plugin
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{dir: t.TempDir(), exec: &recordingExec{}}
	f.subnetFile = filepath.Join(f.dir, "subnet.env")
	f.dataDir = filepath.Join(f.dir, "data")
	f.p = &Plugin{Exec: f.exec, Stdout: &f.out}
	return f
}

// newAddedFixture is a fixture whose container c1 (eth0) was added on the
// lease of testEnv.
func newAddedFixture(t *testing.T) *fixture {
	t.Helper()
	f := newFixture(t)
	f.writeEnv(t, testEnv())
	if err := f.p.Funcs().Add(f.args("")); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) writeEnv(t *testing.T, e subnet.Env) {
	t.Helper()
	if err := subnet.WriteEnv(f.subnetFile, e); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) args(extra string) *skel.CmdArgs {
	conf := `{"cniVersion":"1.0.0","name":"tulle","type":"tulle-cni","subnetFile":"` + f.subnetFile +
		`","dataDir":"` + f.dataDir + `"` + extra + `}`
	return &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/run/netns/x", StdinData: []byte(conf)}
}

func cniCode(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

func TestAddWithoutSubnetEnvAsksWhetherTulledRuns(t *testing.T) {
	f := newFixture(t)
	err := f.p.Funcs().Add(f.args(""))
	want := "tulle-cni: read " + f.subnetFile + ": no such file; is tulled running?"
	if err == nil || err.Error() != want {
		t.Fatalf("Add without subnet.env: %v\nwant: %s", err, want)
	}
	if cniCode(err) != types.ErrTryAgainLater {
		t.Errorf("code %d, want %d (try again later)", cniCode(err), types.ErrTryAgainLater)
	}
	if len(f.exec.calls) != 0 {
		t.Errorf("delegate called %d times", len(f.exec.calls))
	}
	if _, err := os.Stat(f.dataDir); err == nil {
		t.Error("data dir created by a failed ADD")
	}
}

func TestAddSavesTheDelegateConfigAndPrintsTheResult(t *testing.T) {
	f := newFixture(t)
	f.writeEnv(t, testEnv())
	if err := f.p.Funcs().Add(f.args("")); err != nil {
		t.Fatal(err)
	}
	if len(f.exec.calls) != 1 || f.exec.calls[0].command != "ADD" {
		t.Fatalf("delegate calls: %+v", f.exec.calls)
	}
	a, err := Store{Dir: f.dataDir}.Load("c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	var saved map[string]any
	if err := json.Unmarshal(a.Delegate, &saved); err != nil {
		t.Fatal(err)
	}
	jsonEq(t, saved, mustJSON(t, f.exec.calls[0].conf))
	if !strings.Contains(f.out.String(), `"198.18.79.2/24"`) {
		t.Errorf("ADD printed %q, want the delegate's result", f.out.String())
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDelUsesTheSavedConfigWhenSubnetEnvIsGone(t *testing.T) {
	f := newAddedFixture(t)
	if err := os.Remove(f.subnetFile); err != nil {
		t.Fatal(err)
	}
	if err := f.p.Funcs().Del(f.args("")); err != nil {
		t.Fatalf("Del without subnet.env: %v", err)
	}
	del := f.exec.calls[len(f.exec.calls)-1]
	if del.command != "DEL" {
		t.Fatalf("last delegate call %q, want DEL", del.command)
	}
	jsonEq(t, del.conf, mustJSON(t, f.exec.calls[0].conf))
	if _, err := (Store{Dir: f.dataDir}).Load("c1", "eth0"); err == nil {
		t.Error("saved config still there after DEL")
	}
}

func TestDelUsesTheSavedConfigAfterTheLeaseMoved(t *testing.T) {
	f := newAddedFixture(t)
	moved := testEnv()
	moved.Subnet = netip.MustParsePrefix("198.18.80.0/24")
	f.writeEnv(t, moved)
	if err := f.p.Funcs().Del(f.args("")); err != nil {
		t.Fatal(err)
	}
	del := f.exec.calls[len(f.exec.calls)-1]
	if !strings.Contains(mustJSON(t, del.conf), "198.18.79.0/24") {
		t.Errorf("DEL config %v does not release from the lease ADD used", del.conf)
	}
}

func TestDelIsIdempotent(t *testing.T) {
	f := newFixture(t)
	// Nothing saved, no subnet.env: nothing to undo.
	if err := f.p.Funcs().Del(f.args("")); err != nil {
		t.Errorf("Del of an unknown container without subnet.env: %v", err)
	}
	if len(f.exec.calls) != 0 {
		t.Errorf("delegate called for nothing: %+v", f.exec.calls)
	}
	// Nothing saved but subnet.env there: a best-effort delegate DEL frees
	// what a lost file would otherwise leak.
	f.writeEnv(t, testEnv())
	for i := 0; i < 2; i++ {
		if err := f.p.Funcs().Del(f.args("")); err != nil {
			t.Errorf("Del #%d: %v", i+1, err)
		}
	}
	if len(f.exec.calls) != 2 || f.exec.calls[0].command != "DEL" {
		t.Errorf("delegate calls: %+v", f.exec.calls)
	}
}

func TestDelKeepsTheSavedConfigWhenTheDelegateFails(t *testing.T) {
	f := newAddedFixture(t)
	f.exec.fail = errors.New("netlink: busy")
	err := f.p.Funcs().Del(f.args(""))
	if err == nil || !strings.Contains(err.Error(), "tulle-cni: delegate DEL to bridge: netlink: busy") {
		t.Fatalf("Del with a failing delegate: %v", err)
	}
	if _, err := (Store{Dir: f.dataDir}).Load("c1", "eth0"); err != nil {
		t.Errorf("saved config gone after a failed DEL: %v", err)
	}
}

func TestDelPassesPrevResultOn(t *testing.T) {
	f := newAddedFixture(t)
	prev := `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"198.18.79.2/24"}]}`
	if err := f.p.Funcs().Del(f.args(prev)); err != nil {
		t.Fatal(err)
	}
	if _, ok := f.exec.calls[len(f.exec.calls)-1].conf["prevResult"]; !ok {
		t.Error("DEL did not pass prevResult to the delegate")
	}
}

func TestCheckReportsALeaseThatMoved(t *testing.T) {
	f := newAddedFixture(t)
	prev := `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"198.18.79.2/24"}]}`
	if err := f.p.Funcs().Check(f.args(prev)); err != nil {
		t.Fatalf("Check with the same lease: %v", err)
	}
	if c := f.exec.calls[len(f.exec.calls)-1]; c.command != "CHECK" || c.conf["prevResult"] == nil {
		t.Errorf("CHECK call: %+v", c)
	}
	moved := testEnv()
	moved.Subnet = netip.MustParsePrefix("198.18.80.0/24")
	f.writeEnv(t, moved)
	err := f.p.Funcs().Check(f.args(prev))
	if err == nil || !strings.Contains(err.Error(), "given 198.18.79.0/24, but this host's lease is now 198.18.80.0/24") {
		t.Errorf("Check after the lease moved: %v", err)
	}
}

func TestCheckOfAnUnknownContainerFails(t *testing.T) {
	f := newFixture(t)
	f.writeEnv(t, testEnv())
	err := f.p.Funcs().Check(f.args(""))
	if cniCode(err) != types.ErrUnknownContainer {
		t.Errorf("Check of an unknown container: %v (code %d)", err, cniCode(err))
	}
}

func TestStatusIsNotAvailableWithoutSubnetEnv(t *testing.T) {
	f := newFixture(t)
	err := f.p.Funcs().Status(f.args(""))
	if cniCode(err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "is tulled running?") {
		t.Errorf("Status without subnet.env: %v (code %d)", err, cniCode(err))
	}
	f.writeEnv(t, testEnv())
	if err := f.p.Funcs().Status(f.args("")); err != nil {
		t.Errorf("Status with subnet.env: %v", err)
	}
}

func TestGCDeletesOnlyAttachmentsTheRuntimeNoLongerHas(t *testing.T) {
	f := newFixture(t)
	f.writeEnv(t, testEnv())
	for _, id := range []string{"keep", "stale"} {
		a := f.args("")
		a.ContainerID = id
		if err := f.p.Funcs().Add(a); err != nil {
			t.Fatal(err)
		}
	}
	f.exec.calls = nil
	gc := f.args(`,"cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]`)
	if err := f.p.GC(gc); err != nil {
		t.Fatal(err)
	}
	if len(f.exec.calls) != 1 || f.exec.calls[0].command != "DEL" {
		t.Fatalf("GC delegate calls: %+v", f.exec.calls)
	}
	if !slices.Contains(f.exec.calls[0].env, "CNI_CONTAINERID=stale") || !slices.Contains(f.exec.calls[0].env, "CNI_IFNAME=eth0") {
		t.Errorf("GC's DEL ran for the wrong attachment: %v", f.exec.calls[0].env)
	}
	s := Store{Dir: f.dataDir}
	if _, err := s.Load("keep", "eth0"); err != nil {
		t.Errorf("valid attachment's config removed: %v", err)
	}
	if _, err := s.Load("stale", "eth0"); err == nil {
		t.Error("stale attachment's config still there")
	}
}

func TestAddWithACorruptSubnetEnvNamesFileAndLine(t *testing.T) {
	f := newFixture(t)
	if err := os.WriteFile(f.subnetFile, []byte("FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=bogus\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := f.p.Funcs().Add(f.args(""))
	if err == nil || !strings.HasPrefix(err.Error(), "tulle-cni: read "+f.subnetFile+": line 2") {
		t.Errorf("Add with a corrupt subnet.env: %v", err)
	}
}

// A network at CNI 1.1.0 (for STATUS and GC) works with a delegate that
// speaks at most 1.0.0, as Debian 12's bridge: tulle-cni speaks 1.0.0 to
// it, saves that, answers the runtime at 1.1.0 and hands DEL the
// runtime's prevResult converted to 1.0.0.
func TestDelegateGetsTheNewestVersionItSpeaks(t *testing.T) {
	f := newFixture(t)
	f.writeEnv(t, testEnv())
	args := f.args("")
	args.StdinData = bytes.Replace(args.StdinData, []byte(`"cniVersion":"1.0.0"`), []byte(`"cniVersion":"1.1.0"`), 1)
	if err := f.p.Funcs().Add(args); err != nil {
		t.Fatal(err)
	}
	if v := f.exec.calls[0].conf["cniVersion"]; v != "1.0.0" {
		t.Errorf("delegate ADD at version %v, want 1.0.0", v)
	}
	var res map[string]any
	if err := json.Unmarshal(f.out.Bytes(), &res); err != nil || res["cniVersion"] != "1.1.0" {
		t.Errorf("ADD printed %s (%v), want a 1.1.0 result", f.out.Bytes(), err)
	}
	a, err := Store{Dir: f.dataDir}.Load("c1", "eth0")
	if err != nil || !bytes.Contains(a.Delegate, []byte(`"cniVersion":"1.0.0"`)) {
		t.Errorf("saved delegate config %s (%v), want version 1.0.0", a.Delegate, err)
	}

	del := f.args(`,"prevResult":` + f.out.String())
	del.StdinData = bytes.Replace(del.StdinData, []byte(`"cniVersion":"1.0.0"`), []byte(`"cniVersion":"1.1.0"`), 1)
	if err := f.p.Funcs().Del(del); err != nil {
		t.Fatal(err)
	}
	c := f.exec.calls[len(f.exec.calls)-1]
	prev, _ := c.conf["prevResult"].(map[string]any)
	if c.command != "DEL" || c.conf["cniVersion"] != "1.0.0" || prev["cniVersion"] != "1.0.0" {
		t.Errorf("delegate DEL got version %v, prevResult version %v; want both 1.0.0", c.conf["cniVersion"], prev["cniVersion"])
	}

	// A delegate that speaks no version at or below the network's fails
	// ADD with both named.
	f.exec.versions = []string{"2.0.0"}
	err = f.p.Funcs().Add(args)
	if err == nil || !strings.Contains(err.Error(), "bridge speaks CNI [2.0.0], none of them 1.1.0 or older") {
		t.Errorf("ADD with a delegate too new: %v", err)
	}
}
