//! The eBPF tracker: a CO-RE program (`tracker.bpf.c`, built by `build.rs` with clang) on the
//! BTF-typed tracepoint `block:block_rq_complete` reports every completed write, discard and
//! write-zeroes request to the tracked devices through a BPF ring buffer; a thread of the
//! agent (the [`Hub`]) turns the events into per-disk [`DirtySet`]s.
//!
//! # Invariants
//! - **Clear before read.** [`Tracker::take`] first drains the ring buffer (every event of a
//!   request that completed before the call is in it: the program runs in the completion path,
//!   before the waiter is woken), then swaps the disk's set out under the lock. A write that
//!   completes after that marks the block again, whatever the reader got.
//! - **Nothing lost silently.** A full ring buffer counts the event in the program's
//!   `counters[0]`; the hub compares it after every drain and, when it rose, sends every disk
//!   to a verify scan (`Take::All`). So does a failure of the hub thread itself.
//! - **A fresh start sees nothing from before it**, so the first take of each disk is a verify
//!   scan against the acknowledged manifest.
//!
//! # What the kernel reports
//! The request's device is its whole disk (`major << 20 | minor`, the kernel's encoding) and
//! its sector is absolute on that disk: a partition is tracked as the range
//! `[start, start + size)` of its disk. Only request-based (blk-mq) devices complete requests:
//! a bio-based device (device-mapper, md) never fires the tracepoint, so such a disk is
//! refused here and `tracker = "auto"` scans it instead.

pub mod pin;

use super::{DirtySet, Take, Tracker};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(unsafe_code, clippy::all, clippy::unwrap_used, clippy::expect_used)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/tracker.skel.rs"));
}

const STOPPED: &str = "the tracker was stopped";

/// Longest the hub thread waits before it looks at the lost-event counter again (events and
/// commands wake it at once).
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{path}: {message}")]
    Device { path: PathBuf, message: String },
    #[error("loading the eBPF tracker: {0}")]
    Load(String),
    #[error("the eBPF tracker stopped: {0}")]
    Stopped(String),
}

/// Where one configured disk lies on a whole disk the kernel reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSpan {
    /// The whole disk's `major << 20 | minor`.
    pub dev: u32,
    /// First sector (512 bytes) of the configured disk on it, and its length in sectors.
    pub start: u64,
    pub sectors: u64,
}

fn sysfs(dir: &Path, name: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(name))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}/{name}: {e}", dir.display()))
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Finds the whole disk and range behind a block device path (a disk or a partition).
pub fn resolve(path: &Path) -> Result<DeviceSpan, EbpfError> {
    let err = |message: String| EbpfError::Device {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.file_type().is_block_device() {
        return Err(err(
            "not a block device (writes to a file reach the block layer through its filesystem, at other offsets)"
                .into(),
        ));
    }
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let dir = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let sectors: u64 = sysfs(&dir, "size")
        .map_err(err)?
        .parse()
        .map_err(|e| err(format!("{}/size: {e}", dir.display())))?;
    let (whole, start) = if dir.join("partition").exists() {
        let start: u64 = sysfs(&dir, "start")
            .map_err(err)?
            .parse()
            .map_err(|e| err(format!("{}/start: {e}", dir.display())))?;
        // /sys/dev/block/M:m links to .../block/<disk>/<partition>: the parent is the disk.
        let real = std::fs::canonicalize(&dir).map_err(|e| err(e.to_string()))?;
        let parent = real
            .parent()
            .ok_or_else(|| err("partition without a parent disk in sysfs".into()))?
            .to_path_buf();
        (parent, start)
    } else {
        (dir, 0)
    };
    let (wmaj, wmin) = parse_dev(&sysfs(&whole, "dev").map_err(err)?)
        .ok_or_else(|| err(format!("{}/dev is not major:minor", whole.display())))?;
    if !whole.join("mq").exists() {
        return Err(err(format!(
            "{} is a bio-based device (device-mapper, md, ...): it completes no requests the tracker can see",
            whole.display()
        )));
    }
    Ok(DeviceSpan {
        dev: (wmaj << 20) | wmin,
        start,
        sectors,
    })
}

struct Tracked {
    id: String,
    span: DeviceSpan,
    dirty: DirtySet,
    /// Taken by cycles since the last committed point: not acknowledged for good yet, so
    /// a failed cycle or a stop puts them back.
    inflight: DirtySet,
    /// Set when the marks cannot be trusted: the next take is a verify scan, for this reason.
    verify: Option<String>,
}

#[derive(Default)]
struct HubState {
    disks: Vec<Tracked>,
    /// Set once the hub thread has ended: every take is a scan from then on.
    dead: Option<String>,
    events: u64,
    lost: u64,
    /// The program's lost-event counter as last read.
    lost_counter: u64,
}

impl HubState {
    fn apply(&mut self, dev: u32, sector: u64, count: u64) {
        self.events += 1;
        let end = sector.saturating_add(count);
        for d in &mut self.disks {
            let s = &d.span;
            if s.dev != dev {
                continue;
            }
            let (lo, hi) = (sector.max(s.start), end.min(s.start + s.sectors));
            if lo < hi {
                d.dirty.mark_sectors(lo - s.start, hi - lo);
            }
        }
    }

    fn lose_all(&mut self, reason: &str) {
        for d in &mut self.disks {
            d.verify.get_or_insert_with(|| reason.to_string());
        }
    }
}

enum Cmd {
    /// Consume every event in the ring buffer, check the lost counter, then answer.
    Drain(Sender<()>),
    /// Drain, then stop consuming (later events stay in a pinned ring buffer), then answer.
    Stop(Sender<()>),
    /// Track exactly these devices from now on.
    Devices(Vec<u32>),
}

/// What a stopping agent hands to the next one (see [`pin`]).
pub use pin::Resume;

/// One loaded BPF program serving every tracked disk of the agent.
pub struct Hub {
    state: Arc<Mutex<HubState>>,
    cmds: Sender<Cmd>,
    /// An eventfd the thread waits on beside the ring buffer: a command wakes it at once.
    wake_fd: Arc<std::os::fd::OwnedFd>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Where the program and its maps are pinned, when they are.
    pinned: Option<PathBuf>,
}

impl Hub {
    /// Loads and attaches the program for these disks (slot `i` is `disks[i]`), or adopts
    /// the one a previous agent left pinned under `pin_dir`; returns once it is attached, or
    /// why it could not be. `resume` (what a cleanly stopped agent saved) spares a verify scan
    /// for each disk it vouches for.
    pub fn start(
        disks: &[(String, DeviceSpan)],
        ring_kib: u64,
        pin_dir: Option<PathBuf>,
        resume: Option<Resume>,
    ) -> Result<Arc<Hub>, EbpfError> {
        let state = Arc::new(Mutex::new(HubState {
            disks: disks
                .iter()
                .map(|(id, s)| Tracked {
                    id: id.clone(),
                    span: s.clone(),
                    dirty: DirtySet::default(),
                    inflight: DirtySet::default(),
                    verify: Some(
                        "the agent started without a clean record of what changed: verify scan against the acknowledged manifest".into(),
                    ),
                })
                .collect(),
            ..Default::default()
        }));
        let (cmd_tx, cmd_rx) = bounded::<Cmd>(16);
        let (ready_tx, ready_rx) = bounded::<Result<Option<PathBuf>, String>>(1);
        let wake_fd = Arc::new(eventfd().map_err(|e| EbpfError::Load(format!("eventfd: {e}")))?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let devs: Vec<u32> = disks.iter().map(|(_, s)| s.dev).collect();
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            let wake = wake_fd.clone();
            std::thread::Builder::new()
                .name("ebpf-tracker".into())
                .spawn(move || {
                    let args = ThreadArgs {
                        wake: &wake,
                        devs: &devs,
                        ring_kib,
                        pin_dir: pin_dir.as_deref(),
                        resume,
                        state: &state,
                        cmds: &cmd_rx,
                        ready: &ready_tx,
                        stop: &stop,
                    };
                    let outcome = hub_thread(args);
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    match outcome {
                        // Stopped on purpose: the marks stay good (for `Hub::stop`), and
                        // any later take is a scan.
                        Ok(()) => st.dead = Some(STOPPED.into()),
                        Err(e) => {
                            tracing::error!(
                                "eBPF tracker stopped: {e}; every disk will be rescanned"
                            );
                            st.lose_all(&e);
                            st.dead = Some(e);
                        }
                    }
                })
                .map_err(|e| EbpfError::Load(format!("cannot start its thread: {e}")))?
        };
        match ready_rx.recv() {
            Ok(Ok(pinned)) => Ok(Arc::new(Hub {
                state,
                cmds: cmd_tx,
                wake_fd,
                stop,
                thread: Mutex::new(Some(thread)),
                pinned,
            })),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(EbpfError::Load(e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(EbpfError::Load("its thread ended before loading".into()))
            }
        }
    }

    /// Sends a command and waits for the thread's answer; false when none came.
    fn call(&self, cmd: impl FnOnce(Sender<()>) -> Cmd) -> bool {
        let (tx, rx) = bounded(1);
        if self.cmds.send(cmd(tx)).is_err() {
            return false;
        }
        self.wake();
        rx.recv_timeout(Duration::from_secs(10)).is_ok()
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // An eventfd write of 8 bytes; failing only if the counter would overflow, in which
        // case the thread is awake anyway.
        let _ = rustix_free_write(self.wake_fd.as_raw_fd(), &one);
    }

    /// Brings every event up to now into the dirty sets. If the thread does not answer, the
    /// marks cannot be trusted: every disk is verify-scanned.
    fn drain(&self) {
        if !self.call(Cmd::Drain) {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.dead.is_none() {
                st.lose_all("the eBPF tracker did not answer within 10 s");
            }
        }
    }

    /// A disk's device range changed (a resize, a repartition): track the new range, and
    /// verify-scan the disk (writes outside the old range were not marked).
    pub fn update_span(&self, slot: usize, span: Option<DeviceSpan>, why: &str) {
        let devs: Vec<u32> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let d = &mut st.disks[slot];
            if let Some(span) = span {
                d.span = span;
            }
            d.verify.get_or_insert_with(|| why.to_string());
            st.disks.iter().map(|d| d.span.dev).collect()
        };
        let _ = self.cmds.send(Cmd::Devices(devs));
        self.wake();
    }

    /// Events seen and events lost so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.events, st.lost)
    }

    /// Marks everything taken since the last point as acknowledged for good.
    pub fn settle(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for d in &mut st.disks {
            d.inflight.take(0);
        }
    }

    /// Stops consuming events (those that follow stay in the pinned ring buffer for the next
    /// agent) and returns what the next agent needs to go on without a verify scan; `None`
    /// when nothing is pinned or the tracker already failed.
    pub fn stop(&self) -> Option<Resume> {
        self.pinned.as_ref()?;
        self.call(Cmd::Stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.dead.as_deref() != Some(STOPPED) {
            return None;
        }
        let lost_counter = st.lost_counter;
        Some(Resume {
            boot_id: pin::boot_id(),
            lost_counter,
            disks: st
                .disks
                .iter_mut()
                .map(|d| {
                    let mut all = std::mem::take(&mut d.dirty);
                    for b in d.inflight.take(u64::MAX).blocks {
                        all.mark(b);
                    }
                    pin::ResumeDisk {
                        id: d.id.clone(),
                        span: d.span.clone(),
                        verify: d.verify.clone(),
                        blocks: pin::ranges(&all.take(u64::MAX).blocks),
                    }
                })
                .collect(),
        })
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

struct ThreadArgs<'a> {
    wake: &'a std::os::fd::OwnedFd,
    devs: &'a [u32],
    ring_kib: u64,
    pin_dir: Option<&'a Path>,
    resume: Option<Resume>,
    state: &'a Arc<Mutex<HubState>>,
    cmds: &'a Receiver<Cmd>,
    ready: &'a Sender<Result<Option<PathBuf>, String>>,
    stop: &'a std::sync::atomic::AtomicBool,
}

fn hub_thread(a: ThreadArgs) -> Result<(), String> {
    use libbpf_rs::skel::{OpenSkel, SkelBuilder};
    use libbpf_rs::{MapCore, MapFlags, MapHandle};
    let fail = |e: String| {
        let _ = a.ready.send(Err(e.clone()));
        e
    };
    let mut storage = std::mem::MaybeUninit::uninit();
    // In a fresh load: the program and its link (also kept alive by their pins, if any).
    let mut _loaded = None;
    let adopt = a.pin_dir.and_then(pin::adoptable);
    let (events, counters, devices, adopted, pinned) = if let Some(dir) = adopt {
        let open = |name: &str| {
            MapHandle::from_pinned_path(dir.join(name)).map_err(|e| {
                fail(format!(
                    "opening the pinned {name} map in {}: {e}",
                    dir.display()
                ))
            })
        };
        (
            open("events")?,
            open("counters")?,
            open("devices")?,
            true,
            Some(dir),
        )
    } else {
        let mut open = skel::TrackerSkelBuilder::default()
            .open(&mut storage)
            .map_err(|e| fail(format!("opening the BPF object: {e}")))?;
        let ring_bytes = u32::try_from(a.ring_kib * 1024)
            .map_err(|_| fail(format!("ring buffer of {} KiB is too large", a.ring_kib)))?;
        open.maps
            .events
            .set_max_entries(ring_bytes)
            .map_err(|e| fail(format!("sizing the ring buffer: {e}")))?;
        let loaded = open.load().map_err(|e| {
            fail(format!(
                "the kernel refused the program (BTF, CAP_BPF and CAP_PERFMON are needed): {e}"
            ))
        })?;
        let handle = |m: &libbpf_rs::MapMut, name: &str| {
            MapHandle::try_from(m).map_err(|e| fail(format!("the {name} map: {e}")))
        };
        let events = handle(&loaded.maps.events, "events")?;
        let counters = handle(&loaded.maps.counters, "counters")?;
        let devices = handle(&loaded.maps.devices, "devices")?;
        set_devices(&devices, a.devs).map_err(fail)?;
        let mut link = loaded
            .progs
            .on_complete
            .attach()
            .map_err(|e| fail(format!("attaching to block:block_rq_complete: {e}")))?;
        let pinned = a.pin_dir.and_then(|dir| {
            let mut maps = [("events", &events), ("counters", &counters), ("devices", &devices)];
            match pin::pin_all(dir, &mut link, &mut maps) {
                Ok(()) => Some(dir.to_path_buf()),
                Err(e) => {
                    tracing::warn!("not pinning the eBPF tracker in {}: {e}; every restart of the agent will verify-scan its disks", dir.display());
                    None
                }
            }
        });
        _loaded = Some((loaded, link));
        (events, counters, devices, false, pinned)
    };
    let read_counter = |i: u32| -> Result<u64, String> {
        Ok(counters
            .lookup(&i.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| format!("reading the tracker's counters: {e}"))?
            .and_then(|b| {
                b.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_ne_bytes)
            })
            .unwrap_or(0))
    };
    let lost_now = read_counter(0).map_err(fail)?;
    if adopted {
        // The devices this agent tracks now: exactly the configured ones (added before the
        // stale ones go, so that no configured device is ever missing from the map).
        set_devices(&devices, a.devs).map_err(fail)?;
        let mut st = a.state.lock().unwrap_or_else(|p| p.into_inner());
        st.lost_counter = lost_now;
        match a.resume {
            Some(r) if r.lost_counter == lost_now && r.boot_id == pin::boot_id() => {
                for d in &mut st.disks {
                    if let Some(saved) = r.disks.iter().find(|s| s.id == d.id && s.span == d.span) {
                        d.verify = saved.verify.clone();
                        for (first, n) in &saved.blocks {
                            for b in *first..first + n {
                                d.dirty.mark(b);
                            }
                        }
                        tracing::info!(disk = %d.id, dirty_blocks = d.dirty.len(), "eBPF tracking resumed from the previous agent's clean stop");
                    }
                }
            }
            Some(r) if r.lost_counter != lost_now => {
                st.lose_all("tracker events were lost while the agent was stopped");
            }
            _ => {}
        }
    } else {
        a.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lost_counter = lost_now;
    }
    let mut builder = libbpf_rs::RingBufferBuilder::new();
    {
        let state = a.state.clone();
        builder
            .add(&events, move |data: &[u8]| {
                if data.len() >= 16 {
                    let word = |r: std::ops::Range<usize>| {
                        let mut b = [0u8; 8];
                        b[..r.len()].copy_from_slice(&data[r]);
                        u64::from_ne_bytes(b)
                    };
                    let (dev, sectors, sector) = (word(0..4) as u32, word(4..8), word(8..16));
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.apply(dev, sector, sectors);
                }
                0
            })
            .map_err(|e| fail(format!("ring buffer: {e}")))?;
    }
    let ring = builder
        .build()
        .map_err(|e| fail(format!("ring buffer: {e}")))?;
    let _ = a.ready.send(Ok(pinned.clone()));
    tracing::info!(
        devices = a.devs.len(),
        ring_kib = a.ring_kib,
        pinned = ?pinned,
        adopted,
        "eBPF tracker attached to block:block_rq_complete"
    );

    let check_lost = || -> Result<(), String> {
        let v = read_counter(0)?;
        let lost = {
            let mut st = a.state.lock().unwrap_or_else(|p| p.into_inner());
            let n = v.saturating_sub(st.lost_counter);
            if n > 0 {
                st.lost_counter = v;
                st.lost += n;
                st.lose_all(&format!(
                    "{n} tracker events lost (ring buffer full: raise ebpf_ring_buffer_kib, or a driver-private write)"
                ));
            }
            n
        };
        // Logged with no lock held: a log sink that blocks must not stall a take.
        if lost > 0 {
            tracing::warn!(
                lost,
                "eBPF tracker lost events; the disks will be rescanned"
            );
        }
        Ok(())
    };
    let consume = || -> Result<(), String> {
        loop {
            match ring.consume() {
                Err(e) if e.kind() == libbpf_rs::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| format!("draining the ring buffer: {e}")),
            }
        }
    };
    while !a.stop.load(std::sync::atomic::Ordering::Relaxed) {
        // Wait for events or a command; a signal interrupting the wait is no failure.
        wait_readable(&[ring.epoll_fd(), a.wake.as_raw_fd()], POLL);
        drain_eventfd(a.wake.as_raw_fd());
        consume()?;
        check_lost()?;
        while let Ok(cmd) = a.cmds.try_recv() {
            match cmd {
                Cmd::Drain(reply) => {
                    consume()?;
                    check_lost()?;
                    let _ = reply.send(());
                }
                Cmd::Devices(devs) => set_devices(&devices, &devs)?,
                Cmd::Stop(reply) => {
                    consume()?;
                    check_lost()?;
                    let _ = reply.send(());
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Makes the program's device map exactly `devs`: the new ones first, then the stale ones
/// removed (a configured device is never absent, even for an instant).
fn set_devices(devices: &libbpf_rs::MapHandle, devs: &[u32]) -> Result<(), String> {
    use libbpf_rs::{MapCore, MapFlags};
    for dev in devs {
        devices
            .update(&dev.to_ne_bytes(), &1u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| format!("registering device {dev:#x}: {e}"))?;
    }
    let stale: Vec<Vec<u8>> = devices
        .keys()
        .filter(|k| {
            let k: [u8; 4] = k
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .unwrap_or_default();
            !devs.contains(&u32::from_ne_bytes(k))
        })
        .collect();
    for k in stale {
        let _ = devices.delete(&k);
    }
    Ok(())
}

#[allow(unsafe_code)]
fn eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd(2) takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

#[allow(unsafe_code)]
fn rustix_free_write(fd: std::os::fd::RawFd, buf: &[u8]) -> std::io::Result<()> {
    // SAFETY: write(2) reads `buf.len()` bytes from a live slice.
    let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[allow(unsafe_code)]
fn drain_eventfd(fd: std::os::fd::RawFd) {
    let mut b = [0u8; 8];
    // SAFETY: read(2) into an 8-byte array that lives across the call (non-blocking fd).
    let _ = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
}

/// Waits until one of `fds` is readable, or `timeout`, or a signal.
#[allow(unsafe_code)]
fn wait_readable(fds: &[std::os::fd::RawFd], timeout: Duration) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll(2) on a live array of `p.len()` pollfds.
    let _ = unsafe {
        libc::poll(
            p.as_mut_ptr(),
            p.len() as libc::nfds_t,
            timeout.as_millis() as i32,
        )
    };
}

/// The tracker of one disk: slot `slot` of a [`Hub`].
pub struct EbpfTracker {
    hub: Arc<Hub>,
    slot: usize,
}

impl EbpfTracker {
    pub fn new(hub: Arc<Hub>, slot: usize) -> EbpfTracker {
        EbpfTracker { hub, slot }
    }
}

impl Tracker for EbpfTracker {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn take(&mut self, blocks: u64) -> Take {
        self.hub.drain();
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        let dead = st.dead.clone();
        let d = &mut st.disks[self.slot];
        if let Some(reason) = d.verify.take() {
            d.dirty.take(0);
            d.inflight.take(0);
            return Take::All { reason };
        }
        if let Some(reason) = dead {
            return Take::All { reason };
        }
        let taken = d.dirty.take(blocks);
        for &b in &taken.blocks {
            d.inflight.mark(b);
        }
        Take::Blocks(taken)
    }

    fn give_back(&mut self, taken: Take) {
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        let d = &mut st.disks[self.slot];
        if let Take::All { reason } = taken {
            d.verify.get_or_insert(reason);
        }
        // Everything taken since the last point (this cycle's passes) is marked again.
        for b in d.inflight.take(u64::MAX).blocks {
            d.dirty.mark(b);
        }
    }

    fn mark(&mut self, blocks: &[u64]) {
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        let d = &mut st.disks[self.slot];
        for &b in blocks {
            d.dirty.mark(b);
        }
    }

    fn settle(&mut self) {
        let mut st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        st.disks[self.slot].inflight.take(0);
    }

    fn resized(&mut self, path: &Path) {
        let span = resolve(path)
            .map_err(|e| tracing::warn!("{e}: the disk is verify-scanned until the agent restarts"))
            .ok();
        self.hub
            .update_span(self.slot, span, "the disk changed size: verify scan");
    }

    fn pending(&self) -> Option<u64> {
        let st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        let d = &st.disks[self.slot];
        if d.verify.is_some() || st.dead.is_some() {
            None
        } else {
            Some(d.dirty.len())
        }
    }

    fn pending_bytes(&self) -> Option<u64> {
        let st = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        let d = &st.disks[self.slot];
        if d.verify.is_some() || st.dead.is_some() {
            None
        } else {
            Some(d.dirty.bytes())
        }
    }

    fn sees_writes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(span: DeviceSpan) -> Tracked {
        Tracked {
            id: "d".into(),
            span,
            dirty: DirtySet::default(),
            inflight: DirtySet::default(),
            verify: None,
        }
    }

    #[test]
    fn events_map_to_the_disk_and_partition_they_touch() {
        let mut st = HubState {
            disks: vec![
                tracked(DeviceSpan {
                    dev: 7 << 20,
                    start: 0,
                    sectors: 1 << 20,
                }),
                // A partition of the same disk starting at sector 2048.
                tracked(DeviceSpan {
                    dev: 7 << 20,
                    start: 2048,
                    sectors: 4096,
                }),
                tracked(DeviceSpan {
                    dev: (7 << 20) | 1,
                    start: 0,
                    sectors: 1 << 20,
                }),
            ],
            ..Default::default()
        };
        st.apply(7 << 20, 2040, 16); // straddles the partition's start
        st.apply(7 << 20, 2048 + 4096, 8); // just past the partition
        assert_eq!(st.disks[0].dirty.take(u64::MAX).blocks, vec![1, 2, 6]);
        assert_eq!(
            st.disks[1].dirty.take(u64::MAX).blocks,
            vec![0],
            "partition-relative block 0"
        );
        assert!(st.disks[2].dirty.is_empty(), "another device saw nothing");
    }
}
