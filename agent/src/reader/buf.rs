//! A buffer aligned to 4096 bytes, as O_DIRECT reads require: a whole block (512 KiB), or a
//! few pages.
#![allow(unsafe_code)]

use lifeboat_common::BLOCK_SIZE;
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// A multiple of [`ALIGN`], at most `BLOCK_SIZE`.
    len: usize,
    /// Registered with an io_uring as its fixed buffer: (the ring's engine id, the buffer's
    /// index). Set only by the engine that registered this very allocation, so a buffer
    /// allocated later at the same address is never taken for it.
    pub(super) fixed: Option<(u64, u16)>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: as a Box<[u8]>: a shared reference only gives `&[u8]` (mutation needs `&mut`).
unsafe impl Sync for AlignedBuf {}

fn layout(len: usize) -> Layout {
    // `len` is a non-zero multiple of ALIGN (checked by `with_len`), ALIGN a power of two:
    // the layout is always valid.
    Layout::from_size_align(len, ALIGN).unwrap_or_else(|_| unreachable!())
}

impl AlignedBuf {
    /// A whole block.
    pub fn new() -> AlignedBuf {
        AlignedBuf::with_len(BLOCK_SIZE)
    }

    /// `len` bytes, rounded up to a multiple of [`ALIGN`] (at least one, at most a block).
    pub fn with_len(len: usize) -> AlignedBuf {
        let len = len.clamp(1, BLOCK_SIZE).div_ceil(ALIGN) * ALIGN;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout(len)) };
        match NonNull::new(p) {
            Some(ptr) => AlignedBuf {
                ptr,
                len,
                fixed: None,
            },
            None => handle_alloc_error(layout(len)),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed at allocation) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this exact layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new();
        assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[BLOCK_SIZE - 1] = 7;
        assert_eq!(b.as_slice()[BLOCK_SIZE - 1], 7);
    }
}
