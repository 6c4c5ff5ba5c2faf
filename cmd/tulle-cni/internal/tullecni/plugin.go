package tullecni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/tulle-net/tulle/subnet"
)

// Plugin implements the CNI commands. The zero value is not usable: set
// Stdout (os.Stdout in the binary).
type Plugin struct {
	// Exec runs the delegate plugins; nil means the real executables found
	// in CNI_PATH.
	Exec invoke.Exec
	// Stdout receives ADD's result.
	Stdout io.Writer
}

// Funcs returns the command functions for skel.PluginMainFuncs. Every error
// is a *types.Error whose message starts with "tulle-cni: ", so a runtime's
// log says which plugin of a chain failed.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{
		Add:    named(p.Add),
		Del:    named(p.Del),
		Check:  named(p.Check),
		Status: named(p.Status),
		GC:     named(p.GC),
	}
}

func named(f func(*skel.CmdArgs) error) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		err := f(args)
		if err == nil {
			return nil
		}
		code := types.ErrInternal
		var te *types.Error
		if errors.As(err, &te) {
			code = te.Code
		}
		return types.NewError(code, "tulle-cni: "+err.Error(), "")
	}
}

// readEnv reads subnet.env, turning "not there" into the error a user can
// act on. The code is "try again later": tulled may simply not be up yet.
func readEnv(n *NetConf) (subnet.Env, error) {
	env, err := subnet.ReadEnv(n.SubnetFile)
	if errors.Is(err, fs.ErrNotExist) {
		return subnet.Env{}, types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("read %s: no such file; is tulled running?", n.SubnetFile), "")
	}
	if err != nil {
		return subnet.Env{}, err // names the file and the line
	}
	return env, nil
}

// Add gives the container an address in this host's lease through the
// delegate plugin. The delegate config is saved before the delegate runs,
// so the DEL a runtime sends after a failed ADD finds it.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	n, err := ParseNetConf(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	env, err := readEnv(n)
	if err != nil {
		return err
	}
	d, err := BuildDelegate(n, env)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	conf, err := json.Marshal(d)
	if err != nil {
		return fmt.Errorf("encode delegate config: %w", err)
	}
	ctx := context.Background()
	// Saved as the delegate will get it (at the version it speaks), so
	// DEL and GC repeat exactly that.
	conf, typ, err := p.prepare(ctx, conf, nil, "")
	if err != nil {
		return err
	}
	store := Store{Dir: n.DataDir}
	if err := store.Save(Attachment{Network: n.Name, ContainerID: args.ContainerID, IfName: args.IfName, Delegate: conf}); err != nil {
		return err
	}
	result, err := invoke.DelegateAdd(ctx, typ, conf, p.Exec)
	if err != nil {
		return fmt.Errorf("delegate ADD to %s: %w", typ, err)
	}
	if n.CNIVersion != "" {
		if result, err = result.GetAsVersion(n.CNIVersion); err != nil {
			return fmt.Errorf("convert %s's result to version %s: %w", typ, n.CNIVersion, err)
		}
	}
	return result.PrintTo(p.Stdout)
}

// Del removes the attachment with the delegate config ADD saved, so it
// works when subnet.env is gone or holds another lease. Without a saved
// config (ADD never ran, or the file was lost) it rebuilds the config from
// subnet.env when that exists, so a lost file still frees the address;
// with neither there is nothing to undo. DEL is idempotent.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	n, err := ParseNetConf(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	store := Store{Dir: n.DataDir}
	var conf []byte
	a, err := store.Load(args.ContainerID, args.IfName)
	switch {
	case err == nil:
		conf = a.Delegate
	case errors.Is(err, fs.ErrNotExist):
		env, err := subnet.ReadEnv(n.SubnetFile)
		if err != nil {
			return nil
		}
		d, err := BuildDelegate(n, env)
		if err != nil {
			return nil
		}
		if conf, err = json.Marshal(d); err != nil {
			return fmt.Errorf("encode delegate config: %w", err)
		}
	default:
		return err
	}
	ctx := context.Background()
	conf, typ, err := p.prepare(ctx, conf, n.RawPrevResult, n.CNIVersion)
	if err != nil {
		return err
	}
	if err := invoke.DelegateDel(ctx, typ, conf, p.Exec); err != nil {
		// The saved config stays, so the runtime's retry can finish the job.
		return fmt.Errorf("delegate DEL to %s: %w", typ, err)
	}
	return store.Remove(args.ContainerID, args.IfName)
}

// Check verifies the attachment: the lease it was given must still be this
// host's lease, and the delegate must be satisfied with the container.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	n, err := ParseNetConf(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	a, err := Store{Dir: n.DataDir}.Load(args.ContainerID, args.IfName)
	if errors.Is(err, fs.ErrNotExist) {
		return types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("no saved delegate config for container %s interface %s in %s: was it added by tulle-cni?", args.ContainerID, args.IfName, n.DataDir), "")
	}
	if err != nil {
		return err
	}
	env, err := readEnv(n)
	if err != nil {
		return err
	}
	if err := checkLease(a.Delegate, env, n.SubnetFile); err != nil {
		return err
	}
	ctx := context.Background()
	conf, typ, err := p.prepare(ctx, a.Delegate, n.RawPrevResult, n.CNIVersion)
	if err != nil {
		return err
	}
	if err := invoke.DelegateCheck(ctx, typ, conf, p.Exec); err != nil {
		return fmt.Errorf("delegate CHECK to %s: %w", typ, err)
	}
	return nil
}

// Status says whether ADD can work now: subnet.env is readable and holds a
// lease, and the delegate and IPAM plugins are in CNI_PATH.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	n, err := ParseNetConf(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	env, err := readEnv(n)
	if err != nil {
		var te *types.Error
		if errors.As(err, &te) {
			return types.NewError(types.ErrPluginNotAvailable, te.Msg, "")
		}
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	d, err := BuildDelegate(n, env)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	ipamType, _ := d["ipam"].(map[string]any)["type"].(string)
	for _, plugin := range []string{n.DelegateType(), ipamType} {
		if _, err := p.find(plugin); err != nil {
			return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
		}
	}
	return nil
}

// GC deletes, with their saved delegate config, the attachments of this
// network that the runtime no longer lists as valid (spec 1.1).
func (p *Plugin) GC(args *skel.CmdArgs) error {
	n, err := ParseNetConf(args.StdinData)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	type key struct{ id, ifName string }
	valid := make(map[key]bool, len(n.ValidAttachments))
	for _, v := range n.ValidAttachments {
		valid[key{v.ContainerID, v.IfName}] = true
	}
	store := Store{Dir: n.DataDir}
	saved, errs := store.List(n.Name)
	for _, a := range saved {
		if valid[key{a.ContainerID, a.IfName}] {
			continue
		}
		if err := p.delStale(a); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := store.Remove(a.ContainerID, a.IfName); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// delStale runs the delegate's DEL for an attachment other than the one
// in this process's CNI_ environment (GC carries no container).
func (p *Plugin) delStale(a Attachment) error {
	ctx := context.Background()
	conf, typ, err := p.prepare(ctx, a.Delegate, nil, "")
	if err != nil {
		return err
	}
	path, err := p.find(typ)
	if err != nil {
		return err
	}
	args := &invoke.Args{Command: "DEL", ContainerID: a.ContainerID, IfName: a.IfName, Path: os.Getenv("CNI_PATH")}
	if err := invoke.ExecPluginWithoutResult(ctx, path, conf, args, p.Exec); err != nil {
		return fmt.Errorf("gc container %s interface %s: delegate DEL to %s: %w", a.ContainerID, a.IfName, typ, err)
	}
	return nil
}

func (p *Plugin) find(plugin string) (string, error) {
	paths := filepath.SplitList(os.Getenv("CNI_PATH"))
	var path string
	var err error
	if p.Exec != nil {
		path, err = p.Exec.FindInPath(plugin, paths)
	} else {
		path, err = invoke.FindInPath(plugin, paths)
	}
	if err != nil {
		return "", fmt.Errorf("plugin %q not found in CNI_PATH %q: %w", plugin, os.Getenv("CNI_PATH"), err)
	}
	return path, nil
}

// checkLease compares the ranges the attachment was given with the lease in
// env: after tulled moved to another subnet, the container's address is no
// longer routed to this host.
func checkLease(saved []byte, env subnet.Env, subnetFile string) error {
	var d struct {
		IPAM struct {
			Ranges [][]struct {
				Subnet string `json:"subnet"`
			} `json:"ranges"`
		} `json:"ipam"`
	}
	if err := json.Unmarshal(saved, &d); err != nil {
		return fmt.Errorf("decode saved delegate config: %w", err)
	}
	var had []string
	for _, set := range d.IPAM.Ranges {
		for _, r := range set {
			had = append(had, r.Subnet)
		}
	}
	var now []string
	for _, p := range []netip.Prefix{env.Subnet, env.IPv6Subnet} {
		if p.IsValid() {
			now = append(now, p.Masked().String())
		}
	}
	if !slices.Equal(had, now) {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(
			"container was given %s, but this host's lease is now %s (%s): re-create the container",
			strings.Join(had, ","), strings.Join(now, ","), subnetFile), "")
	}
	return nil
}
