//go:build linux

package udpconn_test

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tulle-net/tulle/backend/udpconn"
)

const benchSeg = 1400 // a full-size overlay datagram

// sendBatch returns messages carrying 64 datagrams of benchSeg bytes to
// dst: 64 plain messages, or 2 GSO messages of 32 segments.
func sendBatch(gso bool, c *udpconn.Conn, to *udpconn.Conn) []udpconn.Message {
	if gso {
		msgs := make([]udpconn.Message, 2)
		for i := range msgs {
			msgs[i] = udpconn.Message{Buf: make([]byte, 32*benchSeg), SegSize: benchSeg, Addr: to.LocalAddr()}
		}
		return msgs
	}
	msgs := make([]udpconn.Message, 64)
	for i := range msgs {
		msgs[i] = udpconn.Message{Buf: make([]byte, benchSeg), Addr: to.LocalAddr()}
	}
	return msgs
}

// drain reads c until it is closed; it returns a stop function that
// closes c and waits.
func drain(c *udpconn.Conn, count *atomic.Int64) func() {
	in := make([]udpconn.Message, 64)
	for i := range in {
		in[i].Buf = make([]byte, udpconn.GROBufferSize)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			n, err := c.ReadBatch(in)
			if err != nil {
				return
			}
			for _, m := range in[:n] {
				if m.SegSize > 0 {
					count.Add(int64((m.N + m.SegSize - 1) / m.SegSize))
				} else {
					count.Add(1)
				}
			}
		}
	}()
	return func() { c.Close(); wg.Wait() }
}

// BenchmarkWriteBatch sends 64 datagrams of 1400 bytes per op over
// loopback to a draining GRO receiver.
func BenchmarkWriteBatch(b *testing.B) {
	for _, bc := range []struct {
		name string
		gso  bool
	}{{"64-messages", false}, {"2-gso-messages-of-32", true}} {
		b.Run(bc.name, func(b *testing.B) {
			a := listen(b, udpconn.Options{})
			rx := listen(b, udpconn.Options{})
			if bc.gso && !a.GSO() {
				b.Skip("no UDP GSO")
			}
			var received atomic.Int64
			stop := drain(rx, &received)
			defer stop()
			msgs := sendBatch(bc.gso, a, rx)
			b.SetBytes(64 * benchSeg)
			b.ReportAllocs()
			start := time.Now()
			b.ResetTimer()
			for range b.N {
				if _, err := a.WriteBatch(msgs); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			el := time.Since(start).Seconds()
			b.ReportMetric(float64(b.N*64)/el, "sent-datagrams/s")
			time.Sleep(10 * time.Millisecond)
			b.ReportMetric(float64(received.Load())/float64(b.N*64), "received-fraction")
		})
	}
}

// BenchmarkReadBatch receives from a sender that sends GSO trains of 32
// datagrams of 1400 bytes as fast as it can; one op is one ReadBatch.
func BenchmarkReadBatch(b *testing.B) {
	for _, bc := range []struct {
		name string
		gro  bool
	}{{"gro", true}, {"no-gro", false}} {
		b.Run(bc.name, func(b *testing.B) {
			tx := listen(b, udpconn.Options{})
			rx := listen(b, udpconn.Options{DisableGRO: !bc.gro})
			msgs := sendBatch(true, tx, rx)
			var wg sync.WaitGroup
			var stopping atomic.Bool
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stopping.Load() {
					if _, err := tx.WriteBatch(msgs); err != nil {
						return
					}
				}
			}()
			defer func() { stopping.Store(true); wg.Wait() }()
			in := make([]udpconn.Message, 64)
			for i := range in {
				in[i].Buf = make([]byte, udpconn.GROBufferSize)
			}
			var datagrams int
			b.ReportAllocs()
			start := time.Now()
			b.ResetTimer()
			for range b.N {
				n, err := rx.ReadBatch(in)
				if err != nil {
					b.Fatal(err)
				}
				for _, m := range in[:n] {
					if m.SegSize > 0 {
						datagrams += (m.N + m.SegSize - 1) / m.SegSize
					} else {
						datagrams++
					}
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(datagrams)/float64(b.N), "datagrams/op")
			b.ReportMetric(float64(datagrams)/time.Since(start).Seconds(), "datagrams/s")
		})
	}
}

// BenchmarkWriteBatchGather sends one GSO train of 44 segments of a 52-byte
// header and 1420 bytes of payload (a TSO superpacket cut for the overlay)
// over loopback, the segments given as one contiguous buffer, as 88 pieces
// (headers and payloads apart, as the data plane cuts a superpacket), or
// as 88 pieces copied into one buffer first.
func BenchmarkWriteBatchGather(b *testing.B) {
	const segs, hl, pl = 44, 52, 1420
	for _, mode := range []string{"contiguous", "pieces", "copied-pieces"} {
		b.Run(mode, func(b *testing.B) {
			a := listen(b, udpconn.Options{})
			rx := listen(b, udpconn.Options{})
			if !a.GSO() {
				b.Skip("no UDP GSO")
			}
			var received atomic.Int64
			stop := drain(rx, &received)
			defer stop()
			hdrs := make([]byte, segs*hl)
			super := make([]byte, 10+hl+segs*pl) // as read from the TUN
			contig := make([]byte, segs*(hl+pl))
			var iov [][]byte
			for i := range segs {
				iov = append(iov, hdrs[i*hl:(i+1)*hl], super[10+hl+i*pl:10+hl+(i+1)*pl])
			}
			msgs := []udpconn.Message{{SegSize: hl + pl, Addr: rx.LocalAddr()}}
			switch mode {
			case "contiguous", "copied-pieces":
				msgs[0].Buf = contig
			case "pieces":
				msgs[0].Iov = iov
			}
			b.SetBytes(segs * (hl + pl))
			b.ReportAllocs()
			for b.Loop() {
				if mode == "copied-pieces" {
					n := 0
					for _, p := range iov {
						n += copy(contig[n:], p)
					}
				}
				if _, err := a.WriteBatch(msgs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
