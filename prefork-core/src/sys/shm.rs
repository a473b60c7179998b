//! Memory shared between the master and its workers: an anonymous
//! MAP_SHARED mapping made before fork, seen only through atomics.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Types that are valid when all-zero and only touched through atomics,
/// so they may live in a mapping shared between processes
/// ([`SharedMap::as_slice_of`]).
///
/// # Safety
/// Implementors must be valid for the all-zero bit pattern, be `Sync`, and
/// be accessed only through atomic operations (no plain field).
pub unsafe trait ZeroValidAtomic: Sync {}

// SAFETY: an atomic integer is valid when all-zero and is Sync.
unsafe impl ZeroValidAtomic for AtomicU64 {}

/// One cache line of atomic words: the unit a per-process record (a
/// scoreboard cell) takes in a shared map, so that two processes never
/// write the same line.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CacheLine {
    words: [AtomicU64; 8],
}

// SAFETY: CacheLine holds only atomics, for which all-zero is a valid value.
unsafe impl ZeroValidAtomic for CacheLine {}

impl CacheLine {
    /// Word `i` (0..8) of the line.
    ///
    /// # Panics
    /// When `i` is 8 or more: the callers index with constants.
    #[inline]
    pub fn word(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }

    /// Every word back to zero.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// A shared, zero-filled memory mapping (mmap MAP_SHARED|MAP_ANONYMOUS):
/// written by workers, read by the master, inherited across fork.
#[derive(Debug)]
pub struct SharedMap {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl SharedMap {
    /// Maps `len` bytes (rounded up to pages by the kernel).
    pub fn new(len: usize) -> io::Result<SharedMap> {
        let size = std::num::NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty map"))?;
        // SAFETY: an anonymous mapping at an address of the kernel's choosing
        // aliases no existing memory; we own it until munmap in Drop.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
            )
        }?;
        Ok(SharedMap { ptr, len })
    }

    /// The mapping as a slice of `T`.
    ///
    /// `T` must be valid when all-zero and safe to share between processes
    /// (atomics): the mapping starts zero-filled and is written concurrently.
    pub fn as_slice_of<T: ZeroValidAtomic>(&self) -> &[T] {
        let n = self.len / std::mem::size_of::<T>();
        // SAFETY: the mapping is page-aligned (so aligned for T, whose
        // alignment is at most a cache line), `n * size_of::<T>() <= len`,
        // zero bytes are a valid T (the ZeroValidAtomic contract), T is only
        // accessed through atomics so concurrent writers in other processes
        // are fine, and the slice borrows `self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<T>(), n) }
    }
}

impl SharedMap {
    /// In this process only, makes bytes `start..start + len` of the
    /// mapping read-only, or readable and writable again (mprotect(2));
    /// both must be multiples of the page size and lie within the mapping.
    /// Another process sharing the mapping keeps its own protection. A
    /// write to a read-only page kills the writer (SIGSEGV).
    pub fn protect(&self, start: usize, len: usize, writable: bool) -> io::Result<()> {
        let page = page_size();
        let end = start
            .checked_add(len)
            .ok_or_else(|| io::Error::other("range overflows"))?;
        if start % page != 0 || len % page != 0 || end > self.len.next_multiple_of(page) {
            return Err(io::Error::other("not a page-aligned range of the mapping"));
        }
        let prot = if writable {
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE
        } else {
            nix::sys::mman::ProtFlags::PROT_READ
        };
        // SAFETY: the range is page-aligned and within the mapping this
        // value owns (checked above); changing its protection cannot make a
        // Rust value invalid: a write to a page made read-only faults
        // instead of happening.
        unsafe { nix::sys::mman::mprotect(self.ptr.byte_add(start), len, prot) }?;
        Ok(())
    }

    /// The start of the mapping, for memory that is used only through raw
    /// pointers handed to the OS (a process-shared pthread mutex).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty (never: a mapping has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; slices borrowed
        // from `self` cannot outlive this drop.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// The size of a memory page.
pub fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}
