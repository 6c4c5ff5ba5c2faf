package udp

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Receive steering. Every worker's socket is bound to Port with
// SO_REUSEPORT. By default the kernel picks the socket by a hash of the
// outer addresses and ports, which between two hosts never change (flannel
// sends from its port to the same port), so one worker would receive
// everything from a peer. A classic BPF program attached to the group
// picks the socket by the inner packet's flow instead, the same for both
// directions of a flow: inner addresses and, for unfragmented TCP and UDP,
// ports. The flows of one peer then spread over the workers (on any
// sender, flannel included), and a flow stays on one worker, in order.

// steerProgram returns the program for a group of n sockets. The program
// sees the datagram from its UDP payload on: the inner IPv4 or IPv6
// packet. For IPv6 the flow is the XOR of the eight address words and, for
// TCP or UDP right after the fixed header, of the ports. Anything else
// goes by the kernel's hash (an index >= n). Classic BPF jumps only
// forward, so each family ends in its own copy of the hash.
func steerProgram(n int) ([]bpf.Instruction, error) {
	if n < 1 {
		return nil, fmt.Errorf("steering program for %d sockets", n)
	}
	hash := []bpf.Instruction{
		bpf.LoadScratch{Dst: bpf.RegA, N: 0}, // the flow, symmetric
		bpf.ALUOpConstant{Op: bpf.ALUOpMul, Val: steerMul},
		bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 16},
		bpf.ALUOpConstant{Op: bpf.ALUOpMod, Val: uint32(n)},
		bpf.RetA{},
	}
	prog := []bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: 0, Size: 1}, // version, IHL
		/* 1 */ bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: 0xf0},
		/* 2 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x40, SkipTrue: 2},
		/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x60, SkipTrue: 25}, // to 29
		/* 4 */ bpf.RetConstant{Val: 0xffffffff},
		// IPv4
		/* 5 */ bpf.LoadAbsolute{Off: 12, Size: 4}, // source
		/* 6 */ bpf.TAX{},
		/* 7 */ bpf.LoadAbsolute{Off: 16, Size: 4}, // destination
		/* 8 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 9 */ bpf.StoreScratch{Src: bpf.RegA, N: 0},
		/* 10 */ bpf.LoadAbsolute{Off: 9, Size: 1}, // protocol
		/* 11 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipTrue: 1},
		/* 12 */ bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 17, SkipTrue: 11}, // to 24
		/* 13 */ bpf.LoadAbsolute{Off: 6, Size: 2}, // flags, fragment offset
		/* 14 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x3fff, SkipTrue: 9}, // to 24
		/* 15 */ bpf.LoadMemShift{Off: 0}, // X = IHL*4
		/* 16 */ bpf.LoadIndirect{Off: 0, Size: 2}, // source port
		/* 17 */ bpf.StoreScratch{Src: bpf.RegA, N: 1},
		/* 18 */ bpf.LoadIndirect{Off: 2, Size: 2}, // destination port
		/* 19 */ bpf.LoadScratch{Dst: bpf.RegX, N: 1},
		/* 20 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 21 */ bpf.LoadScratch{Dst: bpf.RegX, N: 0},
		/* 22 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 23 */ bpf.StoreScratch{Src: bpf.RegA, N: 0},
	}
	prog = append(prog, hash...) // 24-28
	// IPv6, from 29: the address words XORed into X.
	prog = append(prog, bpf.LoadAbsolute{Off: 8, Size: 4}, bpf.TAX{}) // 29, 30
	// 31-51: the other 7 words, 3 instructions each.
	for off := uint32(12); off < 40; off += 4 {
		prog = append(prog, bpf.LoadAbsolute{Off: off, Size: 4}, bpf.ALUOpX{Op: bpf.ALUOpXor}, bpf.TAX{})
	}
	prog = append(prog,
		/* 52 */ bpf.StoreScratch{Src: bpf.RegX, N: 0},
		/* 53 */ bpf.LoadAbsolute{Off: 6, Size: 1}, // next header
		/* 54 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipTrue: 1},
		/* 55 */ bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 17, SkipTrue: 7}, // to 63
		/* 56 */ bpf.LoadAbsolute{Off: 40, Size: 2}, // source port
		/* 57 */ bpf.TAX{},
		/* 58 */ bpf.LoadAbsolute{Off: 42, Size: 2}, // destination port
		/* 59 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 60 */ bpf.LoadScratch{Dst: bpf.RegX, N: 0},
		/* 61 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 62 */ bpf.StoreScratch{Src: bpf.RegA, N: 0},
	)
	return append(prog, hash...), nil // 63-67
}

// steerFilter assembles steerProgram(n) for SO_ATTACH_REUSEPORT_CBPF.
func steerFilter(n int) ([]unix.SockFilter, error) {
	prog, err := steerProgram(n)
	if err != nil {
		return nil, err
	}
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("assemble steering program: %w", err)
	}
	f := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		f[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return f, nil
}

// steerMul is the multiplier of the steering hash (Fibonacci hashing).
const steerMul = 0x9e3779b1

// flowKey is the value steerProgram hashes for the inner packet pkt: the
// XOR of its addresses and, for unfragmented TCP and UDP, of its ports;
// the same for both directions of a flow. ok is false where the program
// picks no socket by the flow: not IPv4 or IPv6 (the kernel's hash), or
// too short for what it loads (the program then ends with socket 0).
func flowKey(pkt []byte) (key uint32, ok bool) {
	if len(pkt) == 0 {
		return 0, false
	}
	switch pkt[0] & 0xf0 {
	case 0x40:
		if len(pkt) < 20 {
			return 0, false
		}
		key = binary.BigEndian.Uint32(pkt[12:]) ^ binary.BigEndian.Uint32(pkt[16:])
		if p := pkt[9]; (p == 6 || p == 17) && (uint16(pkt[6])<<8|uint16(pkt[7]))&0x3fff == 0 {
			x := int(pkt[0]&0x0f) * 4
			if len(pkt) < x+4 {
				return 0, false
			}
			key ^= uint32(binary.BigEndian.Uint16(pkt[x:]) ^ binary.BigEndian.Uint16(pkt[x+2:]))
		}
		return key, true
	case 0x60:
		if len(pkt) < 40 {
			return 0, false
		}
		for off := 8; off < 40; off += 4 {
			key ^= binary.BigEndian.Uint32(pkt[off:])
		}
		if p := pkt[6]; p == 6 || p == 17 {
			if len(pkt) < 44 {
				return 0, false
			}
			key ^= uint32(binary.BigEndian.Uint16(pkt[40:]) ^ binary.BigEndian.Uint16(pkt[42:]))
		}
		return key, true
	}
	return 0, false
}

// steerIndex is the socket of a group of n that steerProgram picks for a
// flow of key.
func steerIndex(key uint32, n int) int {
	return int((key*steerMul)>>16) % n
}
