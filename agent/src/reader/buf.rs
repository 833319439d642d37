//! A 512 KiB buffer aligned to 4096 bytes, as O_DIRECT reads require.
#![allow(unsafe_code)]

use lifeboat_common::BLOCK_SIZE;
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: as a Box<[u8]>: a shared reference only gives `&[u8]` (mutation needs `&mut`).
unsafe impl Sync for AlignedBuf {}

fn layout() -> Layout {
    // BLOCK_SIZE and ALIGN are non-zero powers of two: the layout is always valid.
    Layout::from_size_align(BLOCK_SIZE, ALIGN).unwrap_or_else(|_| unreachable!())
}

impl AlignedBuf {
    pub fn new() -> AlignedBuf {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout()) };
        match NonNull::new(p) {
            Some(ptr) => AlignedBuf { ptr },
            None => handle_alloc_error(layout()),
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to BLOCK_SIZE initialised (zeroed at allocation) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), BLOCK_SIZE) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), BLOCK_SIZE) }
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
        unsafe { dealloc(self.ptr.as_ptr(), layout()) }
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
