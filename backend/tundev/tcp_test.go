//go:build linux

package tundev_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/tests/nstest"
)

// TestOffloadCarriesTCPStream runs a real kernel TCP client against a TCP
// "server" played by the test through the TUN: the client's TSO
// superpackets must come out of a read cut by Split into MTU-sized
// segments with valid checksums, and same-flow segments written through a
// Coalescer must reach the client as one coalesced packet.
func TestOffloadCarriesTCPStream(t *testing.T) { testOffloadCarriesTCPStream(t, false) }

// TestOffloadCarriesTCPStreamOverIPv6 is the same over IPv6: TSO6
// superpackets split, segments written as one GSO TCPv6 packet.
func TestOffloadCarriesTCPStreamOverIPv6(t *testing.T) { testOffloadCarriesTCPStream(t, true) }

func testOffloadCarriesTCPStream(t *testing.T, v6 bool) {
	nstest.EnterNewNetns(t)
	mtu, mss := 1400, 1360
	network, peer := "tcp4", peerAddr
	if v6 {
		mss = 1340 // 1400 - 40 - 20
		network, peer = "tcp6", peerAddr6
	}
	dev := openTUN(t, tundev.Options{MTU: mtu})
	if v6 {
		addIPv6(t, dev)
	}
	q := dev.Queues()[0]
	packets := startReaders(t, dev)
	server := netip.AddrPortFrom(peer, 8080)

	upload := make([]byte, 512<<10)
	for i := range upload {
		upload[i] = byte(i*31 + i>>9)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	results := make(chan serverResult, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		results <- playServer(ctx, newWriter(dev, q), packets, server, mtu, mss, len(upload))
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })

	conn, err := net.DialTimeout(network, server.String(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial through the tun: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(upload); err != nil {
		t.Fatalf("client write: %v", err)
	}
	var res serverResult
	select {
	case res = <-results:
	case <-time.After(10 * time.Second):
		t.Fatal("server side did not receive the upload within 10 s")
	}
	if res.err != nil {
		t.Fatal(res.err)
	}
	if !bytes.Equal(res.received, upload) {
		t.Fatal("bytes read from the tun differ from the client's stream")
	}
	t.Logf("upload of %d bytes: %d segments, up to %d per read", len(upload), res.segments, res.maxBatch)
	if res.maxBatch < 2 {
		t.Errorf("every read held one segment: no TSO superpacket was split")
	}

	// Download: 8 full segments of one flow, coalesced into one write.
	const segs = 8
	download := bytes.Repeat([]byte("tulle-download-"), segs*mss/15+1)[:segs*mss]
	bufs := make([][]byte, segs)
	for i := range bufs {
		flags := byte(tcpACK)
		if i == segs-1 {
			flags |= tcpPSH
		}
		bufs[i] = buildTCP(make([]byte, ipHeaderLen(peer)+20+mss), 0, server, res.client, serverISN+1+uint32(i*mss), res.clientNext,
			flags, nil, download[i*mss:(i+1)*mss])
	}
	before := rxPackets(t, dev)
	if err := newWriter(dev, q).write(bufs...); err != nil {
		t.Fatalf("write: %v", err)
	}
	if delta := rxPackets(t, dev) - before; delta != 1 {
		t.Errorf("the kernel received %d packets for %d in-order segments, want 1 (coalesced)", delta, segs)
	}
	got := make([]byte, len(download))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("client read: %v", err)
	}
	if !bytes.Equal(got, download) {
		t.Fatal("client received other bytes than written")
	}
}

const serverISN = 1_000_000

type serverResult struct {
	client     netip.AddrPort
	clientNext uint32 // next sequence number expected from the client
	received   []byte
	segments   int
	maxBatch   int
	err        error
}

// playServer answers the client's SYN and acknowledges its data until want
// bytes arrived in order, checking every segment.
func playServer(ctx context.Context, w *writer, packets <-chan packet, server netip.AddrPort, mtu, mss, want int) serverResult {
	var r serverResult
	buf := make([]byte, 128)
	next := func() (packet, ipPacket, error) {
		for {
			select {
			case <-ctx.Done():
				return packet{}, ipPacket{}, ctx.Err()
			case p := <-packets:
				if p.readError != nil {
					return p, ipPacket{}, p.readError
				}
				if len(p.data) == 0 || p.data[0]>>4 != 4+2*uint8(b2i(server.Addr().Is6())) {
					continue // the other family (e.g. the kernel's IPv6 solicitations)
				}
				if server.Addr().Is6() && p.data[6] != 6 {
					continue // ICMPv6
				}
				ip, err := parseIP(p.data)
				if err != nil {
					return p, ip, fmt.Errorf("packet read from the tun: %w", err)
				}
				if ip.proto == 6 && ip.dst == server {
					return p, ip, nil
				}
			}
		}
	}
	send := func(flags byte, opts []byte) error {
		pkt := buildTCP(buf, 0, server, r.client, serverISN+1, r.clientNext, flags, opts, nil)
		if flags&tcpSYN != 0 {
			pkt = buildTCP(buf, 0, server, r.client, serverISN, r.clientNext, flags, opts, nil)
		}
		return w.write(pkt)
	}
	for {
		_, ip, err := next()
		if err != nil {
			r.err = err
			return r
		}
		if ip.flags&tcpSYN != 0 {
			r.client, r.clientNext = ip.src, ip.seq+1
			break
		}
	}
	if err := send(tcpSYN|tcpACK, []byte{2, 4, byte(mss >> 8), byte(mss)}); err != nil {
		r.err = err
		return r
	}
	r.received = make([]byte, 0, want)
	for len(r.received) < want {
		p, ip, err := next()
		if err != nil {
			r.err = err
			return r
		}
		if len(ip.payload) == 0 {
			continue
		}
		if len(p.data) > mtu {
			r.err = fmt.Errorf("segment of %d bytes read, above the MTU %d", len(p.data), mtu)
			return r
		}
		if ip.seq != r.clientNext {
			r.err = fmt.Errorf("segment seq %d, want %d (lost or reordered)", ip.seq, r.clientNext)
			return r
		}
		r.received = append(r.received, ip.payload...)
		r.clientNext += uint32(len(ip.payload))
		r.segments++
		r.maxBatch = max(r.maxBatch, p.batch)
		if err := send(tcpACK, nil); err != nil {
			r.err = err
			return r
		}
	}
	return r
}
