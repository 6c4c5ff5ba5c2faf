package proto

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// refSum is RFC 1071 done the obvious way: 16-bit big-endian words.
func refSum(b []byte, initial uint32) uint16 {
	s := initial
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func TestChecksumMatchesTheObviousSumAtEveryLengthAndAlignment(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 3000)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	for _, fill := range []byte{0x00, 0xff} { // carries everywhere
		allSame := make([]byte, 1500)
		for i := range allSame {
			allSame[i] = fill
		}
		if got, want := Sum(allSame, 0), refSum(allSame, 0); got != want {
			t.Errorf("all %#x: Sum %#04x, want %#04x", fill, got, want)
		}
	}
	for off := 0; off < 9; off++ {
		for n := 0; n < 300; n++ {
			b := buf[off : off+n]
			for _, init := range []uint64{0, 0xffff, 0x1234} {
				if got, want := Sum(b, init), refSum(b, uint32(init)); got != want {
					t.Fatalf("off %d len %d init %#x: Sum %#04x, want %#04x", off, n, init, got, want)
				}
				if got, want := Checksum(b, init), ^refSum(b, uint32(init)); got != want {
					t.Fatalf("off %d len %d: Checksum %#04x, want %#04x", off, n, got, want)
				}
			}
		}
	}
	if got, want := Sum(buf, 0), refSum(buf, 0); got != want {
		t.Errorf("3000 bytes: Sum %#04x, want %#04x", got, want)
	}
}

func TestPartialSumCompletedOverDataGivesTheFullChecksum(t *testing.T) {
	// A UDP segment whose checksum field holds the pseudo-header sum (the
	// CHECKSUM_PARTIAL convention): summing the segment yields the checksum.
	src, dst := [4]byte{198, 18, 1, 2}, [4]byte{198, 18, 2, 3}
	seg := make([]byte, 8+101)
	for i := range seg {
		seg[i] = byte(i * 7)
	}
	binary.BigEndian.PutUint16(seg[4:], uint16(len(seg)))
	pseudo := PseudoHeaderSum(src, dst, ProtoUDP, len(seg))
	binary.BigEndian.PutUint16(seg[6:], 0)
	full := Checksum(seg, uint64(pseudo))
	binary.BigEndian.PutUint16(seg[6:], pseudo)
	if got := Checksum(seg, 0); got != full {
		t.Errorf("completing the partial sum gives %#04x, want %#04x", got, full)
	}
	binary.BigEndian.PutUint16(seg[6:], full)
	if Sum(seg, uint64(pseudo)) != 0xffff {
		t.Error("a segment with its full checksum does not verify")
	}
}

func BenchmarkChecksum1500(b *testing.B) {
	buf := make([]byte, 1500)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		Checksum(buf, 0)
	}
}

func BenchmarkChecksum64K(b *testing.B) {
	buf := make([]byte, 65000)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		Checksum(buf, 0)
	}
}
