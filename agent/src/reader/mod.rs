//! The block reader: one interface, two engines (io_uring, pread), chosen at runtime.
//!
//! The source is opened with O_DIRECT where the filesystem allows it (so replication does not
//! evict the server's page cache), else buffered. Reads are 4 KiB-aligned: the last block of
//! a disk is read up to the next 4 KiB boundary and may come back short at end of file.

mod buf;
mod pread;
mod uring;

pub use buf::AlignedBuf;
use lifeboat_common::config::ReaderEngine;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// One read: `len` bytes at `offset` into `buf`; `done` is set to the bytes read.
pub struct ReadReq {
    pub offset: u64,
    pub len: usize,
    pub done: usize,
    pub buf: AlignedBuf,
}

enum Engine {
    Uring(Box<uring::UringEngine>),
    Pread,
}

pub struct BlockReader {
    file: File,
    engine: Engine,
    pub direct: bool,
}

/// The default queue depth of the io_uring engine, and batch size of both engines
/// (`reader_queue_depth` in agent.toml).
pub const DEPTH: usize = 8;

impl BlockReader {
    pub fn open(path: &Path, choice: ReaderEngine, depth: usize) -> io::Result<BlockReader> {
        let depth = depth.max(1);
        let (file, direct) = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (File::open(path)?, false),
            Err(e) => return Err(e),
        };
        let engine = match choice {
            ReaderEngine::Pread => Engine::Pread,
            ReaderEngine::IoUring => Engine::Uring(Box::new(uring::UringEngine::new(depth)?)),
            ReaderEngine::Auto => match uring::UringEngine::new(depth) {
                Ok(u) => Engine::Uring(Box::new(u)),
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}); reading with pread");
                    Engine::Pread
                }
            },
        };
        Ok(BlockReader {
            file,
            engine,
            direct,
        })
    }

    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Uring(_) => "io_uring",
            Engine::Pread => "pread",
        }
    }

    /// Registers a pool of buffers that every read of this reader will use, where the
    /// engine can (io_uring: fixed buffers, pinned once). Returns why not, otherwise; reads
    /// work either way.
    pub fn register(&mut self, bufs: &mut [AlignedBuf]) -> Result<(), String> {
        match &mut self.engine {
            Engine::Uring(u) => u.register(bufs).map_err(|e| e.to_string()),
            Engine::Pread => Err("the pread engine has no fixed buffers".into()),
        }
    }

    /// Reads done into registered buffers so far.
    pub fn fixed_reads(&self) -> u64 {
        match &self.engine {
            Engine::Uring(u) => u.fixed_reads,
            Engine::Pread => 0,
        }
    }

    /// Fills every request. Errors name nothing: the caller knows the disk and blocks.
    pub fn read(&mut self, reqs: &mut [ReadReq]) -> io::Result<()> {
        // The engines write up to `len` bytes into `buf`.
        if reqs.iter().any(|r| r.len > r.buf.len()) {
            return Err(io::Error::other("a read longer than its buffer"));
        }
        let fd = self.file.as_raw_fd();
        match &mut self.engine {
            Engine::Uring(u) => {
                debug_assert!(u.depth() >= 1);
                u.read(fd, reqs)
            }
            Engine::Pread => pread::read(fd, reqs),
        }
    }
}

/// The length to request for a block whose disk-relative length is `len`: rounded up to
/// 4 KiB for O_DIRECT, never past the buffer.
pub fn aligned_len(len: usize) -> usize {
    len.div_ceil(buf::ALIGN) * buf::ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::block::{block_count, block_len, hash_block};
    use lifeboat_common::BLOCK_SIZE;

    fn hashes(path: &Path, engine: ReaderEngine) -> Vec<lifeboat_common::BlockHash> {
        let size = std::fs::metadata(path).unwrap().len();
        let mut r = BlockReader::open(path, engine, DEPTH).unwrap();
        let mut out = Vec::new();
        let n = block_count(size);
        let mut i = 0;
        while i < n {
            let mut reqs: Vec<ReadReq> = (i..(i + DEPTH as u64).min(n))
                .map(|b| ReadReq {
                    offset: b * BLOCK_SIZE as u64,
                    len: aligned_len(block_len(b, size)),
                    done: 0,
                    buf: AlignedBuf::new(),
                })
                .collect();
            r.read(&mut reqs).unwrap();
            for (k, q) in reqs.iter().enumerate() {
                let len = block_len(i + k as u64, size);
                assert!(q.done >= len, "short read at block {}", i + k as u64);
                out.push(hash_block(&q.buf.as_slice()[..len]));
            }
            i += DEPTH as u64;
        }
        out
    }

    #[test]
    fn both_engines_read_the_same() {
        // On the target directory's filesystem (O_DIRECT-capable), not tmpfs.
        let d = tempfile::tempdir_in(
            std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| ".".into()),
        )
        .unwrap();
        let p = d.path().join("disk.img");
        let size = 21 * BLOCK_SIZE as u64 + 12_345;
        let mut data = vec![0u8; size as usize];
        let mut x = 1u64;
        for (i, b) in data.iter_mut().enumerate() {
            if !(i / BLOCK_SIZE).is_multiple_of(3) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (x >> 56) as u8;
            }
        }
        std::fs::write(&p, &data).unwrap();
        let a = hashes(&p, ReaderEngine::Pread);
        // io_uring itself, never a fallback to pread.
        match BlockReader::open(&p, ReaderEngine::IoUring, DEPTH) {
            Ok(r) => assert_eq!(r.engine_name(), "io_uring"),
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "io_uring is needed under CI: {e}"
                );
                eprintln!("SKIPPED (loudly): io_uring unavailable here ({e}): pread only");
                return;
            }
        }
        let b = hashes(&p, ReaderEngine::IoUring);
        assert_eq!(a.len(), 22);
        assert_eq!(a, b);
        let expect: Vec<_> = data.chunks(BLOCK_SIZE).map(hash_block).collect();
        assert_eq!(a, expect);

        // Registered buffers, reused from read to read as the pipeline's pool is, next to one
        // that is not registered: the same bytes, and only the registered ones go fixed.
        let mut r = BlockReader::open(&p, ReaderEngine::IoUring, 4).unwrap();
        let mut pool: Vec<AlignedBuf> = (0..3).map(|_| AlignedBuf::new()).collect();
        r.register(&mut pool).expect(
            "registering 1.5 MiB of buffers needs root, CAP_IPC_LOCK or RLIMIT_MEMLOCK >= 2 MiB",
        );
        let mut fixed = Vec::new();
        for i in 0..22u64 {
            let buf = if i % 4 == 3 {
                AlignedBuf::new()
            } else {
                pool.pop().unwrap()
            };
            let mut reqs = vec![ReadReq {
                offset: i * BLOCK_SIZE as u64,
                len: aligned_len(block_len(i, size)),
                done: 0,
                buf,
            }];
            r.read(&mut reqs).unwrap();
            let q = reqs.pop().unwrap();
            fixed.push(hash_block(&q.buf.as_slice()[..block_len(i, size)]));
            if q.buf.fixed.is_some() {
                pool.insert(0, q.buf);
            }
        }
        assert_eq!(fixed, expect);
        assert_eq!(r.fixed_reads(), 22 - 5, "reads into registered buffers");
        // Another reader's ring never takes them for its own.
        let mut other = BlockReader::open(&p, ReaderEngine::IoUring, 4).unwrap();
        let mut reqs = vec![ReadReq {
            offset: 0,
            len: BLOCK_SIZE,
            done: 0,
            buf: pool.pop().unwrap(),
        }];
        other.read(&mut reqs).unwrap();
        assert_eq!(other.fixed_reads(), 0);
        assert_eq!(hash_block(reqs[0].buf.as_slice()), expect[0]);
    }
}
