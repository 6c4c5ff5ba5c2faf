package health

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestReadinessReasonsFollowStartUpOrder(t *testing.T) {
	etcd := "waiting for etcd at http://192.0.2.250:2379: connection refused"
	for _, tc := range []struct {
		name string
		st   Status
		want string
	}{
		{"etcd down before the lease", Status{EtcdDetail: etcd}, etcd},
		{"etcd down, no detail yet", Status{}, "waiting for etcd"},
		{"etcd up, no lease", Status{EtcdConnected: true}, "no lease yet"},
		{"etcd up, no config", Status{EtcdConnected: true, LeasePhase: "waiting for network config"}, "no lease yet (waiting for network config)"},
		{"lease, no data plane", Status{EtcdConnected: true, LeaseHeld: true}, "data plane not running"},
		{"no subnet.env", Status{EtcdConnected: true, LeaseHeld: true, DataPlaneRunning: true, SubnetFile: "/run/flannel/subnet.env"},
			"subnet.env not written (/run/flannel/subnet.env)"},
		{"ip-masq wanted, failing", Status{EtcdConnected: true, LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true, IPMasqWanted: true, IPMasqError: "iptables: not found"},
			"ip-masq rules not installed: iptables: not found"},
		{"ready", Status{EtcdConnected: true, LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true}, ""},
		{"ready with ip-masq", Status{EtcdConnected: true, LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true, IPMasqWanted: true, IPMasqInstalled: true}, ""},
		{"etcd lost after the lease: still ready", Status{EtcdDetail: etcd, LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true}, ""},
		{"data plane died", Status{EtcdConnected: true, LeaseHeld: true, SubnetEnvWritten: true}, "data plane not running"},
		{"stopping", Status{EtcdConnected: true, LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true, Stopping: true}, "shutting down"},
		{"renewal overdue", Status{LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true, LeaseProblem: "lease 198.18.3.0/24 not renewed", WatchProblem: "watch down"},
			"lease 198.18.3.0/24 not renewed"},
		{"watch down too long", Status{LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true, WatchProblem: "lease watch down since"}, "lease watch down since"},
	} {
		if got := tc.st.NotReadyReason(); got != tc.want {
			t.Errorf("%s: reason %q, want %q", tc.name, got, tc.want)
		}
		if tc.st.Ready() != (tc.want == "") {
			t.Errorf("%s: Ready() = %v", tc.name, tc.st.Ready())
		}
	}
}

func get(t *testing.T, srv *httptest.Server, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestEndpointsReportPublishedState(t *testing.T) {
	st := NewState(3 * time.Second)
	now := time.Now()
	st.now = func() time.Time { return now }
	st.Tick()
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tulle_test_value", Help: "A test value."}, func() float64 { return 7 }))
	srv := httptest.NewServer(Handler(st, reg, slog.New(slog.DiscardHandler)))
	defer srv.Close()

	st.Publish(Status{EtcdDetail: "waiting for etcd at http://192.0.2.250:2379: connection refused"})
	if code, body := get(t, srv, "/readyz"); code != 503 || body != "waiting for etcd at http://192.0.2.250:2379: connection refused\n" {
		t.Errorf("/readyz: %d %q", code, body)
	}
	if code, body := get(t, srv, "/readyz?verbose"); code != 503 || !strings.Contains(body, "[-]lease: waiting for etcd") || !strings.Contains(body, "[+]running ok") {
		t.Errorf("/readyz?verbose: %d %q", code, body)
	}
	st.Publish(Status{EtcdConnected: true, LeaseHeld: true, DataPlaneRunning: true, SubnetEnvWritten: true})
	if code, body := get(t, srv, "/readyz"); code != 200 || body != "ok\n" {
		t.Errorf("/readyz when ready: %d %q", code, body)
	}
	if code, body := get(t, srv, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := get(t, srv, "/metrics"); code != 200 || !strings.Contains(body, "tulle_test_value 7") {
		t.Errorf("/metrics: %d %q", code, body)
	}

	now = now.Add(10 * time.Second) // the main loop stops turning
	if code, body := get(t, srv, "/healthz"); code != 503 || body != "main loop has not turned for 10s\n" {
		t.Errorf("/healthz stalled: %d %q", code, body)
	}
	st.Tick()
	if code, _ := get(t, srv, "/healthz"); code != 200 {
		t.Errorf("/healthz after a tick: %d", code)
	}
	if code, _ := get(t, srv, "/nosuch"); code != 404 {
		t.Errorf("/nosuch: %d", code)
	}
}

func TestServeStopsWithContextAndBusyPortIsAnError(t *testing.T) {
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(ln.Addr().String()); err == nil || !strings.Contains(err.Error(), "listen for HTTP on "+ln.Addr().String()) {
		t.Errorf("second Listen on a busy port: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ln, Handler(NewState(time.Second), prometheus.NewRegistry(), slog.New(slog.DiscardHandler)))
	}()
	resp, err := http.Get("http://" + ln.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
}

func TestPprofServesTheProfilerAndTheCommandLineItIsGiven(t *testing.T) {
	h := Pprof([]string{"tulled", "--etcd-password=REDACTED"})
	for path, want := range map[string]int{"/debug/pprof/": 200, "/debug/pprof/cmdline": 200, "/healthz": 404, "/metrics": 404} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != want {
			t.Errorf("GET %s = %d, want %d", path, rec.Code, want)
		}
		if path == "/debug/pprof/cmdline" && rec.Body.String() != "tulled\x00--etcd-password=REDACTED" {
			t.Errorf("cmdline %q", rec.Body.String())
		}
	}
}
