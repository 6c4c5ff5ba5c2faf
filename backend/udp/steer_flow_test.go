package udp

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"testing"
)

// randomInner returns an inner packet as the steering program may see it:
// IPv4 with any header length, protocol, fragment bits and length
// (truncated ones included), IPv6 with any next header and length, or
// something that is neither.
func randomInner(r *rand.Rand) []byte {
	b := make([]byte, 80)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	protos := []byte{6, 17, 1, 47, 58, 44}
	switch r.IntN(5) {
	case 0, 1:
		b[0] = 0x40 | byte(5+r.IntN(11))
		b[9] = protos[r.IntN(len(protos))]
		// flags and fragment offset: none, DF, MF (a first fragment), an offset, anything
		frag := []uint16{0, 0x4000, 0x2000, 0x0001, 0x00b9, uint16(r.Uint32())}
		binary.BigEndian.PutUint16(b[6:], frag[r.IntN(len(frag))])
	case 2, 3:
		b[0] = 0x60 | b[0]&0x0f
		b[6] = protos[r.IntN(len(protos))]
	}
	return b[:r.IntN(len(b)+1)]
}

// TestFlowKeyPicksTheSocketTheSteeringProgramPicks: the Go twin of the
// steering program (which the TX loop uses to keep a GSO train to one
// flow, and the RX loop to count datagrams steered by another flow's
// packet) agrees with the program on every packet.
func TestFlowKeyPicksTheSocketTheSteeringProgramPicks(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 2, 3, 4, 7, 8} {
		vm := steerVM(t, n)
		for i := range 20000 {
			pkt := randomInner(r)
			got, err := vm.Run(pkt)
			if err != nil {
				t.Fatal(err)
			}
			key, ok := flowKey(pkt)
			switch {
			case ok && steerIndex(key, n) != got:
				t.Fatalf("n=%d, packet %d % x: program picks %d, flowKey %d", n, i, pkt, got, steerIndex(key, n))
			case !ok && got != 0 && got != 0xffffffff:
				t.Fatalf("n=%d, packet %d % x: program picks %d by the flow, flowKey has none", n, i, pkt, got)
			}
		}
	}
}

func TestFlowKeyIsTheSameBothWays(t *testing.T) {
	for _, pair := range [][2][]byte{
		{flowPacket("198.18.1.5", "198.18.2.7", 6, 40000, 5201), flowPacket("198.18.2.7", "198.18.1.5", 6, 5201, 40000)},
		{flowPacket6("2001:db8:1:1::5", "2001:db8:1:2::7", 17, 53, 9999), flowPacket6("2001:db8:1:2::7", "2001:db8:1:1::5", 17, 9999, 53)},
	} {
		a, okA := flowKey(pair[0])
		b, okB := flowKey(pair[1])
		if !okA || !okB || a != b {
			t.Errorf("flow keys %#x (%v) and %#x (%v) of the two directions", a, okA, b, okB)
		}
	}
}

// TestATrainCarriesOneFlow: packets of several flows to one peer, read in
// one batch and all of one size, go out as one GSO train per run of a
// flow, never as one train of several flows (the receiver steers a whole
// train by its first packet: the other flows' packets would land on the
// wrong worker).
func TestATrainCarriesOneFlow(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	tb := b.table.Load()
	flow := func(sport uint16) []byte {
		p := ipv4("198.18.1.5", "198.18.2.7", 200, 64, true)
		binary.BigEndian.PutUint16(p[20:], sport)
		return p
	}
	txReads(t, tx, tb, flow(1), flow(1), flow(2), flow(1), flow(3), flow(3))
	var got []int
	for k := range tx.out[0].msgs {
		var ports []uint16
		for _, d := range datagrams(tx, k) {
			ports = append(ports, binary.BigEndian.Uint16(d[20:]))
		}
		for _, p := range ports[1:] {
			if p != ports[0] {
				t.Fatalf("train %d carries the flows %v", k, ports)
			}
		}
		got = append(got, len(ports))
	}
	if want := []int{2, 1, 1, 2}; !slices.Equal(got, want) {
		t.Fatalf("trains of %v packets, want %v (one per run of a flow)", got, want)
	}
}
