//! The classic BPF program that picks the socket of a SO_REUSEPORT group
//! for each new connection, and attaching it (no `unsafe`: nix wraps it).

use std::io;
use std::os::fd::BorrowedFd;

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_ALU_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
const BPF_RET_A: u16 = 0x16; // BPF_RET | BPF_A

/// The program: `A = random(); A %= live; return A` — a uniformly random
/// socket among the first `live` of the group (the group keeps sockets in
/// the order they started listening, which is slot order).
pub fn steering_program(live: u32) -> [libc::sock_filter; 3] {
    let op = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    [
        op(
            BPF_LD_W_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ),
        op(BPF_ALU_MOD_K, live.max(1)),
        op(BPF_RET_A, 0),
    ]
}

/// Sets SO_ATTACH_REUSEPORT_CBPF (nix's safe wrapper): the program then
/// selects the socket of `fd`'s reuseport group for every new connection.
/// The kernel copies and verifies the program before the call returns.
pub fn attach_steering(fd: BorrowedFd<'_>, live: u32) -> io::Result<()> {
    let mut prog = steering_program(live);
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::AttachReusePortCbpf, &fprog)
        .map_err(io::Error::from)
}
