package etcd

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// keyCollector keeps the batches of a WatchPrefix.
type keyCollector struct{ *batchCollector[KeyEvent] }

// watchPrefix runs WatchPrefix until the end of the test.
func watchPrefix(t *testing.T, r *Registry, suffix string) *keyCollector {
	t.Helper()
	ch := make(chan []KeyEvent)
	c := &keyCollector{collectBatches(t, ch)}
	runUntilEnd(t, "WatchPrefix", func(cx context.Context) error { return r.WatchPrefix(cx, suffix, ch) })
	return c
}

// lines renders the events from batch i on, one per line: "put a=1" or
// "del a".
func (c *keyCollector) lines(from int) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, b := range c.batches[min(from, len(c.batches)):] {
		for _, e := range b {
			if e.Deleted {
				out = append(out, "del "+e.Key)
			} else {
				out = append(out, "put "+e.Key+"="+string(e.Value))
			}
		}
	}
	return out
}

func put(t *testing.T, c *clientv3.Client, key, value string) {
	t.Helper()
	if _, err := c.Put(ctx(t), key, value); err != nil {
		t.Fatal(err)
	}
}

func del(t *testing.T, c *clientv3.Client, key string) {
	t.Helper()
	if _, err := c.Delete(ctx(t), key); err != nil {
		t.Fatal(err)
	}
}

func TestWatchPrefixOfAnotherKeyFamilyIncludingCompaction(t *testing.T) {
	t.Parallel()
	s := etcdtest.Start(t)
	c := s.Client()
	prefix := testPrefix(t)
	put(t, c, prefix+"/policies/b", "B1")
	put(t, c, prefix+"/policies/a", "A1")
	put(t, c, prefix+"/policiesX", "not below policies/")
	put(t, c, prefix+"/subnets/198.18.1.0-24", otherValue(1))
	p := etcdtest.NewProxy(t, s.Addr())
	lg, logs := testLogger(t)
	r := newRegistry(t, p.Endpoint(), prefix, lg)
	w := watchPrefix(t, r, "policies/")
	empty := watchPrefix(t, r, "netsets/")

	eventually(t, 10*time.Second, "both snapshots", func() bool { return w.nbatches() >= 1 && empty.nbatches() >= 1 })
	if got := strings.Join(w.lines(0), ", "); got != "put a=A1, put b=B1" {
		t.Errorf("snapshot: %s", got)
	}
	if empty.mu.Lock(); len(empty.batches[0]) != 0 {
		t.Errorf("snapshot of an empty prefix: %+v", empty.batches[0])
	}
	empty.mu.Unlock()

	// Changes arrive in order; a put that changes nothing is not sent.
	put(t, c, prefix+"/policies/c", "C1")
	put(t, c, prefix+"/policies/b", "B1")
	put(t, c, prefix+"/policies/a", "A2")
	del(t, c, prefix+"/policies/c")
	put(t, c, prefix+"/netsets/n", "N1")
	want := "put c=C1, put a=A2, del c"
	eventually(t, 10*time.Second, want, func() bool { return strings.Join(w.lines(1), ", ") == want })
	eventually(t, 10*time.Second, "the put on netsets/", func() bool { return strings.Join(empty.lines(1), ", ") == "put n=N1" })

	// Cut off while others change the keys and etcd compacts past the
	// watcher: on its return it sends exactly the difference.
	before := w.nbatches()
	p.Cut()
	eventually(t, 10*time.Second, "the watcher to notice", func() bool { return !r.Status().Connected })
	del(t, c, prefix+"/policies/b")
	put(t, c, prefix+"/policies/a", "A3")
	put(t, c, prefix+"/policies/d", "D1")
	put(t, c, prefix+"/policies/e", "E1")
	del(t, c, prefix+"/policies/e")
	put(t, c, prefix+"/policies/f", "F1")
	put(t, c, prefix+"/policies/f", "F1") // a new revision, the same value
	resp, err := c.Get(ctx(t), "/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Compact(ctx(t), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	p.Heal()
	want = "del b, put a=A3, put d=D1, put f=F1"
	eventually(t, 20*time.Second, want, func() bool { return strings.Join(w.lines(before), ", ") == want })
	if !strings.Contains(logs.String(), "compacted") {
		t.Error("the re-list after compaction was not logged")
	}
	// And on from there, nothing twice.
	put(t, c, prefix+"/policies/g", "G1")
	want += ", put g=G1"
	eventually(t, 10*time.Second, want, func() bool { return strings.Join(w.lines(before), ", ") == want })
	put(t, c, prefix+"/netsets/m", "M1")
	eventually(t, 10*time.Second, "netsets/ watch going on after the cut", func() bool {
		return strings.Join(empty.lines(2), ", ") == "put m=M1"
	})
	if got := strings.Join(w.lines(before), ", "); got != want {
		t.Errorf("after the re-list: %s, want %s", got, want)
	}
}

func TestKeyHelpersReadAndWriteBelowThePrefix(t *testing.T) {
	t.Parallel()
	s := etcdtest.Start(t)
	c := s.Client()
	prefix := testPrefix(t)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	cx := ctx(t)
	rev, err := r.PutKey(cx, "policies/web", []byte(`{"allow":"80"}`))
	if err != nil || rev == 0 {
		t.Fatalf("PutKey: %d %v", rev, err)
	}
	if kv := getKV(t, c, prefix+"/policies/web"); len(kv.Kvs) != 1 || string(kv.Kvs[0].Value) != `{"allow":"80"}` {
		t.Errorf("stored %+v", kv.Kvs)
	}
	if v, ok, err := r.GetKey(cx, "policies/web"); err != nil || !ok || string(v) != `{"allow":"80"}` {
		t.Errorf("GetKey = %q %v %v", v, ok, err)
	}
	if _, ok, err := r.GetKey(cx, "policies/none"); err != nil || ok {
		t.Errorf("GetKey of a missing key = %v %v", ok, err)
	}
	if _, err := r.PutKey(cx, "policies/db", []byte("x")); err != nil {
		t.Fatal(err)
	}
	list, lrev, err := r.ListPrefix(cx, "policies/")
	if err != nil || len(list) != 2 || list[0].Key != "db" || list[1].Key != "web" || lrev < rev {
		t.Errorf("ListPrefix = %+v %d %v", list, lrev, err)
	}
	if existed, err := r.DeleteKey(cx, "policies/web"); err != nil || !existed {
		t.Errorf("DeleteKey = %v %v", existed, err)
	}
	if existed, err := r.DeleteKey(cx, "policies/web"); err != nil || existed {
		t.Errorf("DeleteKey again = %v %v", existed, err)
	}
	for _, bad := range []string{"", "/abs", "config", "subnets/198.18.1.0-24", "subnets", "policies/"} {
		if _, err := r.PutKey(cx, bad, []byte("x")); err == nil {
			t.Errorf("PutKey(%q) accepted", bad)
		}
		if _, err := r.DeleteKey(cx, bad); err == nil {
			t.Errorf("DeleteKey(%q) accepted", bad)
		}
	}
	if err := r.WatchPrefix(cx, "/abs", nil); err == nil {
		t.Error("WatchPrefix(/abs) accepted")
	}
}
