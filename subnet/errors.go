package subnet

import "errors"

var (
	// ErrLeaseLost means the own subnet could not be kept: its key was
	// deleted or expired and another host holds the subnet now, or it was
	// overwritten by another host. The daemon exits non-zero on it.
	ErrLeaseLost = errors.New("lease lost")
	// ErrNoFreeSubnet means every subnet between SubnetMin and SubnetMax is
	// held (by a lease or a reservation).
	ErrNoFreeSubnet = errors.New("no free subnet")
	// ErrLeaseGone is returned by Registry.RenewLease when the key no longer
	// exists or is no longer held by the lease being renewed.
	ErrLeaseGone = errors.New("lease key gone or no longer ours")
	// ErrSubnetTaken is returned by Registry.ReacquireLease when another
	// host holds the subnet.
	ErrSubnetTaken = errors.New("subnet held by another host")
	// ErrConfigNotFound means <prefix>/config does not exist (yet).
	ErrConfigNotFound = errors.New("network config not found")
	// ErrInvalidConfig is wrapped by every rejection of a network config
	// (see ConfigError).
	ErrInvalidConfig = errors.New("invalid network config")
)

// ConfigError is one rejection of a network config. Its message names the
// field, the value and the rule, e.g. "SubnetLen 31: must be at most 30".
// errors.Is(err, ErrInvalidConfig) is true for it.
type ConfigError struct {
	Field string // JSON field, e.g. "SubnetLen" or "Backend.Port"
	Value string // the offending value as written, "" when absent
	Rule  string // what the value must be
}

func (e *ConfigError) Error() string {
	if e.Value == "" {
		return e.Field + ": " + e.Rule
	}
	return e.Field + " " + e.Value + ": " + e.Rule
}

// Unwrap makes errors.Is(err, ErrInvalidConfig) hold.
func (e *ConfigError) Unwrap() error { return ErrInvalidConfig }

// ErrRefused means that the registry answered but refused us: a wrong
// password, a user without permission, a TLS certificate one side does not
// accept. Retrying does not help; the configuration must change, so the
// daemon exits with status 2 when it meets this at start.
var ErrRefused = errors.New("refused by the registry")
