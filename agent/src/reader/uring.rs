//! io_uring read engine: a batch of block reads submitted at once, completed in any order,
//! into registered (fixed) buffers where the caller registered its pool.
#![allow(unsafe_code)]

use super::{AlignedBuf, ReadReq};
use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct UringEngine {
    ring: IoUring,
    depth: usize,
    /// Tells this ring's registered buffers from another's.
    id: u64,
    /// Waits interrupted (EINTR, EAGAIN, EBUSY) and retried, over the engine's life.
    pub retried_waits: u64,
    /// Reads into registered buffers (`IORING_OP_READ_FIXED`), over the engine's life.
    pub fixed_reads: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl UringEngine {
    /// Sets up a ring of `depth` entries; fails where the kernel or a sandbox forbids io_uring.
    pub fn new(depth: usize) -> io::Result<UringEngine> {
        let ring = IoUring::new(depth as u32)?;
        Ok(UringEngine {
            ring,
            depth,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            retried_waits: 0,
            fixed_reads: 0,
        })
    }

    /// Registers `bufs` as the ring's fixed buffers (once per ring): the kernel pins their
    /// pages once, instead of on every read. Reads into them then go as `READ_FIXED`; reads
    /// into any other buffer as plain reads. Fails where the locked-memory limit is too low
    /// (without CAP_IPC_LOCK, RLIMIT_MEMLOCK counts the pinned pages).
    ///
    /// The buffers may be dropped while registered: the kernel keeps its own reference to the
    /// pinned pages, and only a read submitted into a buffer that is alive (it carries the
    /// mark set here) ever uses them.
    pub fn register(&mut self, bufs: &mut [AlignedBuf]) -> io::Result<()> {
        if bufs.is_empty() || bufs.len() > u16::MAX as usize {
            return Err(io::Error::other("no buffers, or too many, to register"));
        }
        let iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: each iovec describes a live allocation of its length that `bufs` owns; the
        // kernel pins those pages (holding its own references) for as long as the ring keeps
        // them registered, and writes into them only for a READ_FIXED we submit, which we do
        // only for a buffer still alive and exclusively borrowed for that read (see `read`).
        unsafe { self.ring.submitter().register_buffers(&iovecs)? };
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fixed = Some((self.id, i as u16));
        }
        Ok(())
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Reads every request; each `req.done` is the number of bytes read (short at EOF).
    ///
    /// Never returns while the kernel may still write into a buffer: every submitted read is
    /// reaped first, whatever fails. An interrupted wait is retried; a read that completes
    /// with EAGAIN or EINTR is finished with pread.
    pub fn read(&mut self, fd: RawFd, reqs: &mut [ReadReq]) -> io::Result<()> {
        for chunk in reqs.chunks_mut(self.depth) {
            // All or nothing: an entry pushed and never submitted would be submitted later,
            // into a buffer that may be gone by then.
            {
                let sq = self.ring.submission();
                if sq.capacity() - sq.len() < chunk.len() {
                    return Err(io::Error::other("io_uring submission queue has no room"));
                }
            }
            for (i, r) in chunk.iter_mut().enumerate() {
                r.done = 0;
                let (ptr, len) = (r.buf.as_mut_ptr(), r.len as u32);
                let e = match r.buf.fixed {
                    // Registered with this ring: its index and the very allocation (the mark
                    // is set on the registered buffer itself, `len` is within it).
                    Some((ring, index)) if ring == self.id => {
                        self.fixed_reads += 1;
                        opcode::ReadFixed::new(types::Fd(fd), ptr, len, index)
                            .offset(r.offset)
                            .build()
                    }
                    _ => opcode::Read::new(types::Fd(fd), ptr, len)
                        .offset(r.offset)
                        .build(),
                }
                .user_data(i as u64);
                // SAFETY: the buffer outlives the operation: `reap` waits for every
                // completion of this chunk before we go on or return, and `chunk` borrows
                // the buffers mutably for that whole time. The queue has room (checked above).
                unsafe {
                    let pushed = self.ring.submission().push(&e);
                    debug_assert!(pushed.is_ok(), "room was checked");
                }
            }
            let first_err = self.reap(chunk);
            if let Some(e) = first_err {
                return Err(e);
            }
            // Finish short reads (allowed by the kernel anywhere), and reads the kernel asked
            // to retry, with plain pread.
            for r in chunk.iter_mut() {
                if r.done < r.len {
                    super::pread::finish(fd, r)?;
                }
            }
        }
        Ok(())
    }

    /// Waits for every completion of `chunk`; returns the first read error. Only returns
    /// once nothing of the chunk is in flight.
    fn reap(&mut self, chunk: &mut [ReadReq]) -> Option<io::Error> {
        let mut left = chunk.len();
        let mut first_err = None;
        let mut ring_failures = 0u32;
        while left > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => ring_failures = 0,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) =>
                {
                    self.retried_waits += 1
                }
                Err(e) => {
                    // The reads may still land in the buffers: we cannot give them back.
                    // Retry for a while; a ring that never recovers leaves no safe way on.
                    ring_failures += 1;
                    if ring_failures > 100 {
                        tracing::error!(
                            "io_uring wait keeps failing ({e}) with {left} read(s) in flight; \
                             aborting rather than free buffers the kernel may still fill"
                        );
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            for cqe in self.ring.completion() {
                left -= 1;
                let i = cqe.user_data() as usize;
                let res = cqe.result();
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    // Left at done = 0: finished by pread.
                } else if res < 0 {
                    first_err.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if let Some(r) = chunk.get_mut(i) {
                    r.done = res as usize;
                }
            }
        }
        first_err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::buf::AlignedBuf;

    extern "C" fn ignore(_: libc::c_int) {}

    /// Signals arriving while the engine waits interrupt `io_uring_enter` (EINTR): the wait
    /// is retried and the read still arrives. (A pipe keeps the read pending until the test
    /// writes to it, so the signals land during the wait every time.)
    #[test]
    fn interrupted_waits_are_retried() {
        let Ok(mut engine) = UringEngine::new(8) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "io_uring is needed under CI"
            );
            eprintln!("SKIPPED (loudly): io_uring unavailable");
            return;
        };
        // SAFETY: installs a handler that does nothing for SIGUSR2 (no SA_RESTART, so
        // interrupted system calls fail with EINTR); the handler is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
        }
        let mut fds = [0; 2];
        // SAFETY: pipe(2) writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (rd, wr) = (fds[0], fds[1]);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let writer = std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(std::time::Duration::from_millis(30));
                // SAFETY: the reading thread lives until this one is joined.
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR2) };
            }
            let data = [0x5au8; 4096];
            // SAFETY: writes 4096 bytes (atomic on a pipe) from `data` to our pipe's end.
            let n = unsafe { libc::write(wr, data.as_ptr().cast(), data.len()) };
            assert_eq!(n, 4096);
        });
        let mut reqs = vec![ReadReq {
            offset: 0,
            len: 4096,
            done: 0,
            buf: AlignedBuf::new(),
        }];
        let r = engine.read(rd, &mut reqs);
        writer.join().unwrap();
        // SAFETY: closing the two descriptors pipe(2) gave us, once.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        r.unwrap();
        assert_eq!(reqs[0].done, 4096);
        assert!(reqs[0].buf.as_slice()[..4096].iter().all(|&b| b == 0x5a));
        assert!(
            engine.retried_waits > 0,
            "no wait was interrupted: the retry path was not exercised"
        );
    }
}
