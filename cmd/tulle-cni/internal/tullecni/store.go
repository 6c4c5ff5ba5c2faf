package tullecni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/utils"
	"github.com/tulle-net/tulle/subnet"
)

// savedVersion is the format version of a saved attachment file.
const savedVersion = 1

// Attachment is what ADD saves for one container interface: the delegate
// config it used, so DEL and CHECK run with exactly that config even when
// subnet.env has changed or is gone.
type Attachment struct {
	Version     int             `json:"version"`
	Network     string          `json:"network"`
	ContainerID string          `json:"containerID"`
	IfName      string          `json:"ifName"`
	Delegate    json.RawMessage `json:"delegate"`
}

// Store keeps one file per attachment in Dir, named
// "<containerID>@<ifName>.json". CNI forbids '@' in container IDs and '/'
// in interface names, so the name is unambiguous and stays inside Dir.
type Store struct {
	Dir string
}

func (s Store) path(containerID, ifName string) (string, error) {
	if err := utils.ValidateContainerID(containerID); err != nil {
		return "", fmt.Errorf("container ID %q: %w", containerID, err)
	}
	if err := utils.ValidateInterfaceName(ifName); err != nil {
		return "", fmt.Errorf("interface name %q: %w", ifName, err)
	}
	return filepath.Join(s.Dir, containerID+"@"+ifName+".json"), nil
}

// Save writes a atomically (temp file + rename), readable by root only.
func (s Store) Save(a Attachment) error {
	p, err := s.path(a.ContainerID, a.IfName)
	if err != nil {
		return err
	}
	a.Version = savedVersion
	b, err := json.Marshal(a)
	if err != nil {
		return fmt.Errorf("save delegate config %s: %w", p, err)
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return fmt.Errorf("save delegate config: %w", err)
	}
	if err := subnet.WriteFileAtomic(p, b, 0o600); err != nil {
		return fmt.Errorf("save delegate config %s: %w", p, err)
	}
	return nil
}

// Load reads the attachment saved for containerID and ifName. The error
// wraps fs.ErrNotExist when there is none.
func (s Store) Load(containerID, ifName string) (Attachment, error) {
	p, err := s.path(containerID, ifName)
	if err != nil {
		return Attachment{}, err
	}
	return loadFile(p)
}

func loadFile(p string) (Attachment, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return Attachment{}, fmt.Errorf("load delegate config: %w", err)
	}
	var a Attachment
	if err := json.Unmarshal(b, &a); err != nil {
		return Attachment{}, fmt.Errorf("load delegate config %s: %w", p, err)
	}
	if a.Version != savedVersion {
		return Attachment{}, fmt.Errorf("load delegate config %s: format version %d, want %d", p, a.Version, savedVersion)
	}
	if len(a.Delegate) == 0 {
		return Attachment{}, fmt.Errorf("load delegate config %s: no delegate config in it", p)
	}
	return a, nil
}

// Remove deletes the saved attachment; a missing one is not an error.
func (s Store) Remove(containerID, ifName string) error {
	p, err := s.path(containerID, ifName)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove delegate config: %w", err)
	}
	return nil
}

// List returns every saved attachment of network. Files that cannot be
// read are returned as errors next to the good ones, so one bad file does
// not hide the rest.
func (s Store) List(network string) ([]Attachment, []error) {
	entries, err := os.ReadDir(s.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("list delegate configs: %w", err)}
	}
	var out []Attachment
	var errs []error
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		a, err := loadFile(filepath.Join(s.Dir, e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if a.Network == network {
			out = append(out, a)
		}
	}
	return out, errs
}
