//! Socket options that socket2 does not wrap: TCP_DEFER_ACCEPT, the
//! accept queue of a listener read from TCP_INFO, and a socket filter that
//! drops every packet (a listener that takes no new connection).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets TCP_DEFER_ACCEPT on a listening TCP socket: a connection becomes
/// acceptable only when its first data arrives (or, for a client that sends
/// nothing, about `secs` later). 0 turns it off.
pub fn set_tcp_defer_accept(fd: BorrowedFd<'_>, secs: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: the pointer and length describe `v`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches a classic BPF socket filter that drops every packet
/// (SO_ATTACH_FILTER, `ret #0`) to a listening TCP socket: new SYNs are
/// dropped, so clients retransmit them (a balancer retries another host)
/// instead of queueing connections that would be reset when the listener
/// closes; connections already in its accept queue stay there to be
/// accepted. Not undone: only for a master that is stopping.
pub fn drop_new_connections(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut prog = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: the pointer and length describe `fprog`, whose filter points
    // at `prog`; both outlive the call, and the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// getsockopt(IPPROTO_TCP, `opt`) into `out`. Only for plain C data (an
/// int, `tcp_info`), for which any bytes the kernel writes are valid.
fn tcp_getsockopt<T>(fd: BorrowedFd<'_>, opt: libc::c_int, out: &mut T) -> io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `*out`, which outlives the
    // call; the kernel writes at most `len` bytes; callers pass plain data.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            (out as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads TCP_DEFER_ACCEPT (seconds, as the kernel rounds them; 0 when off).
pub fn tcp_defer_accept(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    tcp_getsockopt(fd, libc::TCP_DEFER_ACCEPT, &mut v)?;
    Ok(u32::try_from(v).unwrap_or(0))
}

/// Accept queue of a listening TCP socket from TCP_INFO: (connections
/// waiting to be accepted, the backlog limit).
pub fn tcp_accept_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    tcp_getsockopt(fd, libc::TCP_INFO, &mut info)?;
    // For a listener, Linux reports the accept queue in tcpi_unacked and
    // the backlog in tcpi_sacked.
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_accept_queue_counts_unaccepted_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let _a = std::net::TcpStream::connect(addr).expect("a");
        let _b = std::net::TcpStream::connect(addr).expect("b");
        use std::os::fd::AsFd;
        let (queued, backlog) = tcp_accept_queue(l.as_fd()).expect("tcp_info");
        assert_eq!(queued, 2);
        assert!(backlog >= 2);
    }
}
