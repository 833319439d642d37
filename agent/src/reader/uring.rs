//! io_uring read engine: a batch of block reads submitted at once, completed in any order.
#![allow(unsafe_code)]

use super::ReadReq;
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;

pub struct UringEngine {
    ring: IoUring,
    depth: usize,
}

impl UringEngine {
    /// Sets up a ring of `depth` entries; fails where the kernel or a sandbox forbids io_uring.
    pub fn new(depth: usize) -> io::Result<UringEngine> {
        let ring = IoUring::new(depth as u32)?;
        Ok(UringEngine { ring, depth })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Reads every request; each `req.done` is the number of bytes read (short at EOF).
    pub fn read(&mut self, fd: RawFd, reqs: &mut [ReadReq]) -> io::Result<()> {
        for chunk in reqs.chunks_mut(self.depth) {
            for (i, r) in chunk.iter_mut().enumerate() {
                let e = opcode::Read::new(types::Fd(fd), r.buf.as_mut_ptr(), r.len as u32)
                    .offset(r.offset)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the buffer outlives the operation: we wait for every completion of
                // this chunk below before returning, and `chunk` borrows the buffers mutably
                // for that whole time. The queue has room: at most `depth` entries per chunk.
                unsafe {
                    self.ring
                        .submission()
                        .push(&e)
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                }
            }
            let mut left = chunk.len();
            let mut first_err = None;
            while left > 0 {
                self.ring.submit_and_wait(1)?;
                for cqe in self.ring.completion() {
                    left -= 1;
                    let i = cqe.user_data() as usize;
                    let res = cqe.result();
                    if res < 0 {
                        first_err.get_or_insert(io::Error::from_raw_os_error(-res));
                    } else if let Some(r) = chunk.get_mut(i) {
                        r.done = res as usize;
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            // Finish short reads (allowed by the kernel anywhere) with plain pread.
            for r in chunk.iter_mut() {
                if r.done < r.len {
                    super::pread::finish(fd, r)?;
                }
            }
        }
        Ok(())
    }
}
