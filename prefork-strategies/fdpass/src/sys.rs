//! The fdpass strategy's only `unsafe`: receiving a descriptor with
//! SCM_RIGHTS so that *every* descriptor the kernel installed becomes an
//! `OwnedFd` at once, whatever else is wrong with the message (a truncated
//! control buffer included, where nix's iterator refuses to look).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Room for this many descriptors in one message; more sets MSG_CTRUNC.
const MAX_FDS: usize = 16;

/// The largest message received whole; a longer one sets MSG_TRUNC.
pub const MAX_MESSAGE: usize = crate::protocol::MAX_MESSAGE;

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// Payload bytes.
    pub data: Vec<u8>,
    /// Every descriptor that arrived, owned (closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// MSG_CTRUNC or MSG_TRUNC was set.
    pub truncated: bool,
    /// A control message other than SCM_RIGHTS arrived.
    pub foreign_cmsg: bool,
}

/// Wraps recvmsg(2) with MSG_CMSG_CLOEXEC (and MSG_DONTWAIT if `nonblocking`).
/// Ok(None): EOF (the other end closed). EAGAIN (and, when blocking, EINTR)
/// comes back as an error.
pub fn recv_with_fds(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<Option<Received>> {
    // Not zeroed: most messages are one byte, and recvmsg writes what it
    // returns.
    let mut data = [std::mem::MaybeUninit::<u8>::uninit(); MAX_MESSAGE];
    // u64 elements keep the control buffer aligned for cmsghdr.
    let space = unsafe_cmsg_space(MAX_FDS);
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let flags = libc::MSG_CMSG_CLOEXEC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    let n = loop {
        // SAFETY: `msg` points to `iov`, `data` and `control`, which outlive
        // the call; their lengths are set from the buffers themselves.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        // A blocking wait interrupted by a signal returns, so that the
        // worker sees a stop request at once; a non-blocking one retries.
        if e.raw_os_error() != Some(libc::EINTR) || !nonblocking {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    let mut foreign_cmsg = false;
    // SAFETY: the kernel filled `control` up to msg_controllen with
    // well-formed cmsghdrs (CMSG_* walk within it); every SCM_RIGHTS payload
    // is an array of descriptors now installed in this process, which we
    // take ownership of exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                let payload = h.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / std::mem::size_of::<RawFd>();
                let first = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(first.add(i));
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            } else {
                foreign_cmsg = true;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    // SAFETY: recvmsg wrote the first `n` bytes of `data` (n <= its length).
    let received = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), n) };
    Ok(Some(Received {
        data: received.to_vec(),
        fds,
        truncated: msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0,
        foreign_cmsg,
    }))
}

fn unsafe_cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Wraps sendmsg(2) with SCM_RIGHTS for `fds` and `data` as payload, never
/// blocking (MSG_DONTWAIT) and without SIGPIPE (MSG_NOSIGNAL).
pub fn send_with_fds(fd: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let iov = [io::IoSlice::new(data)];
    let cmsgs: &[nix::sys::socket::ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    nix::sys::socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &iov,
        cmsgs,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}
