//! The classic BPF program that picks the socket of a SO_REUSEPORT group
//! for each new connection, and attaching it (no `unsafe`: nix wraps it).

use std::io;
use std::os::fd::BorrowedFd;

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_ALU_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
const BPF_RET_A: u16 = 0x16; // BPF_RET | BPF_A

const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// The program for the sockets at `serving` (indices in the group, which
/// keeps sockets in the order they started listening: slot order).
///
/// When they are `0..n` (every slot up to the live count has a worker), it
/// is three instructions: `A = random(); A %= n; return A`. When some slot
/// in between is vacant, `A = random() % n`, then `if A == i return
/// serving[i]` for each i: a uniform pick among the serving sockets,
/// 2n + 3 instructions (the kernel allows 4096; the pool caps at 1024).
pub fn steering_program(serving: &[u32]) -> Vec<libc::sock_filter> {
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let n = serving.len().max(1) as u32;
    let mut prog = vec![
        op(
            BPF_LD_W_ABS,
            0,
            0,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ),
        op(BPF_ALU_MOD_K, 0, 0, n),
    ];
    let contiguous = serving.iter().enumerate().all(|(i, &s)| s == i as u32);
    if contiguous {
        prog.push(op(BPF_RET_A, 0, 0, 0));
        return prog;
    }
    for (i, &slot) in serving.iter().enumerate() {
        // Equal: fall through to the return; not equal: skip it.
        prog.push(op(BPF_JEQ_K, 0, 1, i as u32));
        prog.push(op(BPF_RET_K, 0, 0, slot));
    }
    prog.push(op(BPF_RET_K, 0, 0, serving.first().copied().unwrap_or(0)));
    prog
}

/// Sets SO_ATTACH_REUSEPORT_CBPF (nix's safe wrapper): the program then
/// selects the socket of `fd`'s reuseport group for every new connection.
/// The kernel copies and verifies the program before the call returns.
pub fn attach_steering(fd: BorrowedFd<'_>, serving: &[u32]) -> io::Result<()> {
    let mut prog = steering_program(serving);
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::AttachReusePortCbpf, &fprog)
        .map_err(io::Error::from)
}
