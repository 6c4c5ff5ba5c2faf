package tullecni

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
)

// A network may say cniVersion 1.1.0 (so that runtimes send STATUS and GC,
// which tulle-cni answers itself) while the delegate speaks only older
// versions: Debian 12's bridge and host-local (plugins v1.1.1) refuse
// anything above 1.0.0. tulle-cni therefore speaks to the delegate at the
// newest version both know and converts results between the two.

// delegateVersion returns the version to speak to the delegate at path:
// want if it supports it, else the newest version it supports below want.
func (p *Plugin) delegateVersion(ctx context.Context, typ, path, want string) (string, error) {
	info, err := invoke.GetVersionInfo(ctx, path, p.Exec)
	if err != nil {
		return "", fmt.Errorf("ask delegate %s for its CNI versions: %w", typ, err)
	}
	supported := info.SupportedVersions()
	if want == "" || slices.Contains(supported, want) {
		return want, nil
	}
	best := ""
	for _, v := range supported {
		if above, err := version.GreaterThan(v, want); err != nil || above {
			continue
		}
		if newer, err := version.GreaterThan(v, best); best == "" || (err == nil && newer) {
			best = v
		}
	}
	if best == "" {
		return "", fmt.Errorf("delegate %s speaks CNI %v, none of them %s or older", typ, supported, want)
	}
	return best, nil
}

// prepare returns the delegate config conf (as saved or built) ready for
// the delegate: at a cniVersion the delegate speaks (negotiated from the
// one conf has) and with prev, the runtime's prevResult in version
// prevVersion, converted to that version (nil: none). It also returns the
// delegate's type.
func (p *Plugin) prepare(ctx context.Context, conf []byte, prev map[string]any, prevVersion string) ([]byte, string, error) {
	var d map[string]any
	if err := json.Unmarshal(conf, &d); err != nil {
		return nil, "", fmt.Errorf("decode delegate config: %w", err)
	}
	typ, _ := d["type"].(string)
	if typ == "" {
		return nil, "", fmt.Errorf("delegate config has no type")
	}
	path, err := p.find(typ)
	if err != nil {
		return nil, "", err
	}
	want, _ := d["cniVersion"].(string)
	v, err := p.delegateVersion(ctx, typ, path, want)
	if err != nil {
		return nil, "", err
	}
	if v != "" {
		d["cniVersion"] = v
	}
	if prev != nil {
		if d["prevResult"], err = convertResult(prev, prevVersion, v); err != nil {
			return nil, "", err
		}
	}
	out, err := json.Marshal(d)
	if err != nil {
		return nil, "", fmt.Errorf("encode delegate config: %w", err)
	}
	return out, typ, nil
}

// convertResult converts a result in version from to version to.
func convertResult(r map[string]any, from, to string) (map[string]any, error) {
	if from == to || from == "" || to == "" {
		return r, nil
	}
	b, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("encode prevResult: %w", err)
	}
	res, err := version.NewResult(from, b)
	if err != nil {
		return nil, fmt.Errorf("parse prevResult (version %s): %w", from, err)
	}
	conv, err := res.GetAsVersion(to)
	if err != nil {
		return nil, fmt.Errorf("convert prevResult from version %s to %s: %w", from, to, err)
	}
	if b, err = json.Marshal(conv); err != nil {
		return nil, fmt.Errorf("encode prevResult: %w", err)
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("decode prevResult: %w", err)
	}
	return out, nil
}
