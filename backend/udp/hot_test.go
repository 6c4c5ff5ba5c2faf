package udp

import (
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// coldLoops returns, of the given loops (each named by the frames its
// goroutine's stack holds), those that wait cold: blocked in a system call
// in fdpoll's Wait, their P handed back to the scheduler.
func coldLoops(t *testing.T, loops map[string][]string) []string {
	t.Helper()
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var cold []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if !strings.Contains(g, "[syscall") || !strings.Contains(g, "fdpoll.(*Stop).Wait(") {
			continue
		}
	loops:
		for name, frames := range loops {
			for _, f := range frames {
				if !strings.Contains(g, f) {
					continue loops
				}
			}
			cold = append(cold, name)
		}
	}
	return cold
}

// TestLoopsWaitHotAfterTrafficAndColdWhenIdle: a loop that just moved a
// packet waits hot (keeping its P: no [syscall] goroutine in Wait), one that
// did not, or has been idle for hotFor, waits cold.
func TestLoopsWaitHotAfterTrafficAndColdWhenIdle(t *testing.T) {
	h := newTwoHosts(t)
	a := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 1, lease(leaseB, hostB))
	b := startBackend(t, h.b, h.tunName("b"), leaseB, hostB, "offload", 1, lease(leaseA, hostA))
	// The loop's worker is its receiver; runTX or runRX may be inlined.
	frame := func(method string, w *worker) []string {
		return []string{fmt.Sprintf("udp.(*worker).loop(%p", w), "udp.(*worker)." + method}
	}
	loops := map[string][]string{
		"a tx": frame("runTX", a.workers[0]), "a rx": frame("runRX", a.workers[0]),
		"b tx": frame("runTX", b.workers[0]), "b rx": frame("runRX", b.workers[0]),
	}
	all := []string{"a rx", "a tx", "b rx", "b tx"}
	waitCold := func(want []string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got := coldLoops(t, loops)
			if strings.Join(sorted(got), ",") == strings.Join(want, ",") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("loops waiting cold: %v, want %v", sorted(got), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitCold(all) // no traffic yet
	if !a.hot.Load() || !b.hot.Load() {
		t.Fatalf("loops may not wait hot: GOMAXPROCS %d", runtime.GOMAXPROCS(0))
	}
	app := listenUDP(t, h.b, netip.AddrPortFrom(leaseB.Addr(), 5000))
	src := listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 5000))
	if _, err := src.WriteToUDPAddrPort([]byte("hot"), netip.AddrPortFrom(leaseB.Addr(), 5000)); err != nil {
		t.Fatal(err)
	}
	readUDP(t, app, 5*time.Second)
	sent := time.Now()
	if got := sorted(coldLoops(t, loops)); strings.Join(got, ",") != "a rx,b tx" || time.Since(sent) > hotFor/2 {
		t.Fatalf("loops waiting cold %v after a packet from a to b (%v ago), want a rx and b tx only", got, time.Since(sent))
	}
	waitCold(all) // idle again: within hotFor + hotWait
	if d := time.Since(sent); d < hotFor {
		t.Fatalf("the loops that moved the packet waited cold again %v after it, before hotFor (%v)", d, hotFor)
	}
}

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}
