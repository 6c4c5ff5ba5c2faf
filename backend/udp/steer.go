package udp

import (
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
// sees the datagram from its UDP payload on: the inner IPv4 packet.
// Anything that is not IPv4 goes by the kernel's hash (an index >= n).
func steerProgram(n int) ([]bpf.Instruction, error) {
	if n < 1 {
		return nil, fmt.Errorf("steering program for %d sockets", n)
	}
	return []bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: 0, Size: 1}, // version, IHL
		/* 1 */ bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: 0xf0},
		/* 2 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x40, SkipTrue: 1},
		/* 3 */ bpf.RetConstant{Val: 0xffffffff},
		/* 4 */ bpf.LoadAbsolute{Off: 12, Size: 4}, // source
		/* 5 */ bpf.TAX{},
		/* 6 */ bpf.LoadAbsolute{Off: 16, Size: 4}, // destination
		/* 7 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 8 */ bpf.StoreScratch{Src: bpf.RegA, N: 0},
		/* 9 */ bpf.LoadAbsolute{Off: 9, Size: 1}, // protocol
		/* 10 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipTrue: 1},
		/* 11 */ bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 17, SkipTrue: 11},
		/* 12 */ bpf.LoadAbsolute{Off: 6, Size: 2}, // flags, fragment offset
		/* 13 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x3fff, SkipTrue: 9},
		/* 14 */ bpf.LoadMemShift{Off: 0}, // X = IHL*4
		/* 15 */ bpf.LoadIndirect{Off: 0, Size: 2}, // source port
		/* 16 */ bpf.StoreScratch{Src: bpf.RegA, N: 1},
		/* 17 */ bpf.LoadIndirect{Off: 2, Size: 2}, // destination port
		/* 18 */ bpf.LoadScratch{Dst: bpf.RegX, N: 1},
		/* 19 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 20 */ bpf.LoadScratch{Dst: bpf.RegX, N: 0},
		/* 21 */ bpf.ALUOpX{Op: bpf.ALUOpXor},
		/* 22 */ bpf.StoreScratch{Src: bpf.RegA, N: 0},
		/* 23 */ bpf.LoadScratch{Dst: bpf.RegA, N: 0}, // the flow, symmetric
		/* 24 */ bpf.ALUOpConstant{Op: bpf.ALUOpMul, Val: 0x9e3779b1},
		/* 25 */ bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 16},
		/* 26 */ bpf.ALUOpConstant{Op: bpf.ALUOpMod, Val: uint32(n)},
		/* 27 */ bpf.RetA{},
	}, nil
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
