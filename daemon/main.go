// Package daemon is tulled: it reads flags and environment, picks the
// underlay interface, takes a subnet lease from etcd, runs the udp data
// plane, writes subnet.env, installs the masquerade rules, reports readiness
// (systemd, /readyz) and metrics, and on SIGTERM or SIGINT takes it all down
// again in reverse, leaving the lease in etcd so a restart keeps the subnet.
//
// Start-up order (each step logged; /readyz says which one it waits for):
//
//	config -> interface -> etcd (bounded, logged retries) -> lease ->
//	TUN + address + route + MTU -> data plane -> lease events applied ->
//	subnet.env -> ip-masq -> ready (sd_notify READY=1, /readyz 200)
//
// Exit status: 0 after SIGTERM or SIGINT, 1 on a runtime failure (etcd not
// reachable within --etcd-start-timeout, lease lost, data plane died),
// 2 on a usage or configuration error.
//
// A Tulle host marks its lease with BackendData {"tulle":{"version":...}}
// and leaves BackendType empty, exactly as a flannel udp host does, so
// flannel hosts read Tulle's leases as udp leases (their udp backend ignores
// BackendData) while `tulled status` can tell the two apart.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/tulle-net/tulle/daemon/buildinfo"
	"github.com/tulle-net/tulle/daemon/config"
)

// Exit statuses.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// configError marks a failure caused by the configuration (a named
// interface that does not exist, a network config Tulle can not serve):
// exit status 2.
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

func asConfigError(err error) error { return &configError{err: err} }

// ExitCode maps an error from Run to the process exit status.
func ExitCode(err error) int {
	var ue *config.UsageError
	var ce *configError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &ue), errors.As(err, &ce):
		return ExitUsage
	default:
		return ExitFailure
	}
}

// Main is tulled's main: args without the program name, env as
// os.Environ. It returns the exit status.
func Main(args, env []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "status":
			return statusMain(args[1:], env, stdout, stderr)
		case "docker-opts":
			return dockerOptsMain(args[1:], env, stdout, stderr)
		case "policy":
			return policyMain(args[1:], env, os.Stdin, stdout, stderr)
		case "version":
			fmt.Fprintln(stdout, buildinfo.Get())
			return ExitOK
		case "help":
			config.Usage(stdout)
			return ExitOK
		}
	}
	cfg, action, err := config.Parse(args, env)
	if code, done := commandLineDone("tulled", err, action, config.Usage, stdout, stderr); done {
		return code
	}
	if action == config.ActionVersion {
		fmt.Fprintln(stdout, buildinfo.Get())
		return ExitOK
	}
	logger := NewLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	for _, w := range cfg.Warnings {
		logger.Warn(w)
	}
	tuneGC(env, logger)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	sigDone := make(chan struct{})
	go func() {
		defer close(sigDone)
		select {
		case s := <-sigs:
			logger.Info("signal received; stopping (a second one kills tulled at once)", "signal", s.String())
			signal.Reset(syscall.SIGTERM, syscall.SIGINT)
			cancel()
		case <-ctx.Done():
		}
	}()

	err = Run(ctx, cfg, logger)
	cancel()
	<-sigDone
	code := ExitCode(err)
	if err != nil {
		logger.Error("tulled stopped", "error", err, "exit_status", code)
	} else {
		logger.Info("tulled stopped", "exit_status", code)
	}
	return code
}

// commandLineDone ends command cmd (tulled or one of its subcommands) when
// its parsed command line says so: refused (err, then where to read the
// usage, on stderr: ExitUsage) or asking for help (usage on stdout:
// ExitOK). done is false when the command is to go on. err is prefixed with
// cmd unless it names cmd already.
func commandLineDone(cmd string, err error, action config.Action, usage func(io.Writer), stdout, stderr io.Writer) (code int, done bool) {
	switch {
	case err != nil:
		msg := err.Error()
		if !strings.HasPrefix(msg, cmd+":") && !strings.HasPrefix(msg, cmd+" ") {
			msg = cmd + ": " + msg
		}
		fmt.Fprintf(stderr, "%s\nRun '%s --help' for the usage.\n", msg, cmd)
		return ExitUsage, true
	case action == config.ActionHelp:
		usage(stdout)
		return ExitOK, true
	}
	return 0, false
}

// NewLogger returns the daemon's structured logger: format "text" or
// "json", to w.
func NewLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
