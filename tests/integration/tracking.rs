//! eBPF change tracking and frozen, crash-consistent points, on loop devices with real ext4
//! and the real BPF program (root; in CI a missing capability is a failure, not a skip).

use lifeboat_tests::*;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECTOR_ALIGN: usize = 4096;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ebpf_spec(server: &str, disks: &[(&str, &Path)], extra: &[&str]) -> AgentSpec {
    let mut spec = AgentSpec::new(server, disks);
    spec.interval_secs = 1;
    spec.extra = ["tracker = \"ebpf\""]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    spec
}

fn last_point(rx: &Receiver, server: &str) -> u64 {
    rx.points(server)
        .iter()
        .filter_map(|p| p["point"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Waits until the receiver lists a point newer than `after`; returns the newest.
fn wait_point_after(rx: &Receiver, agent: &Agent, server: &str, after: u64) -> u64 {
    let start = Instant::now();
    loop {
        let p = last_point(rx, server);
        if p > after {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no point after {after} within 60 s; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Files the workload keeps: version `n` goes to slot `n % SLOTS`, replacing the one before.
const SLOTS: u64 = 150;

/// Version `n` of a workload file: its number, then bytes that follow from it.
fn content(n: u64) -> Vec<u8> {
    let mut rng = Rng::new(n * 7919 + 1);
    let len = 4096 + rng.below(300_000) as usize;
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v[..8].copy_from_slice(&n.to_le_bytes());
    v
}

/// Replaces files as applications do (write a temporary, fsync, rename over the old version,
/// fsync the directory) until stopped; records when each version was complete.
fn workload(dir: PathBuf, stop: Arc<AtomicBool>, done: Arc<Mutex<Vec<(u64, u64)>>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let tmp = dir.join("tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(&content(n)).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, dir.join(format!("f-{}", n % SLOTS))).unwrap();
        std::fs::File::open(&dir).unwrap().sync_all().unwrap();
        done.lock().unwrap().push((n, now_ms()));
        n += 1;
    }
}

/// Restores `disk` of `point` to `<w>/restored-<point>.img`.
fn restore(rx: &Receiver, w: &Path, server: &str, disk: &str, point: u64) -> PathBuf {
    let out = w.join(format!("restored-{disk}-{point}.img"));
    let o = rx.restore(server, disk, &point.to_string(), &out);
    assert!(
        o.status.success(),
        "restore of point {point}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// What `e2fsck -fn` (ext4, as restored) or `xfs_repair -n` (XFS, after its log is replayed)
/// would repair in a restored image: nothing, for a frozen point.
fn fsck_problems(fstype: &str, img: &Path) -> Option<String> {
    let o = match fstype {
        "xfs" => {
            // A frozen XFS keeps a log record to replay (ext4 does not): replay it by
            // mounting, as a boot would, then check.
            let dir = img.with_extension("replay");
            drop(Mounted::with(None, img, &dir).unwrap());
            Command::new("xfs_repair")
                .arg("-n")
                .arg(img)
                .output()
                .unwrap()
        }
        "btrfs" => Command::new("btrfs")
            .args(["check", "--readonly"])
            .arg(img)
            .output()
            .unwrap(),
        _ => Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(img)
            .output()
            .unwrap(),
    };
    if o.status.code() == Some(0) {
        return None;
    }
    Some(format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    ))
}

fn points_of(rx: &Receiver, server: &str) -> Vec<Value> {
    rx.points(server)
}

#[test]
fn frozen_points_of_a_busy_ext4_restore_every_completed_file_exactly() {
    frozen_points_of_a_busy_filesystem("ext4");
}

#[test]
fn frozen_points_of_a_busy_xfs_restore_every_completed_file_exactly() {
    frozen_points_of_a_busy_filesystem("xfs");
}

/// btrfs shows an anonymous device in mountinfo: the freeze finds it by its source.
#[test]
fn frozen_points_of_a_busy_btrfs_restore_every_completed_file_exactly() {
    frozen_points_of_a_busy_filesystem("btrfs");
}

fn frozen_points_of_a_busy_filesystem(fstype: &str) {
    let w = workdir();
    let Some(dev) = needs_root("frozen points", LoopDev::new(w.path(), "disk", 512)) else {
        return;
    };
    let mnt = Mounted::with(Some(fstype), &dev.dev, &w.path().join("mnt")).unwrap();
    let rx = Receiver::start(w.path());
    let spec = ebpf_spec("busy", &[("root", &dev.dev)], &[]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let first = wait_point_after(&rx, &agent, "busy", 0);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (dir, stop, done) = (mnt.dir.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || workload(dir, stop, done))
    };
    // Points keep coming while the workload runs.
    let mut p = first;
    for _ in 0..6 {
        p = wait_point_after(&rx, &agent, "busy", p);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    agent.kill();
    let done = done.lock().unwrap().clone();
    assert!(
        done.len() > 20,
        "the workload completed only {} files",
        done.len()
    );

    let points: Vec<Value> = points_of(&rx, "busy")
        .into_iter()
        .filter(|p| p["point"].as_u64().unwrap() > first)
        .collect();
    assert!(points.len() >= 6);
    let mut checked_files = 0;
    for pt in &points {
        let point = pt["point"].as_u64().unwrap();
        assert_eq!(
            pt["consistency"], "crash_consistent",
            "point {point} is not crash-consistent: {}",
            pt["consistency_why"]
        );
        let instant = pt["created_unix_ms"].as_u64().unwrap();
        let img = restore(&rx, w.path(), "busy", "root", point);
        if let Some(p) = fsck_problems(fstype, &img) {
            panic!("point {point}: {fstype} repair finds damage in a frozen point:\n{p}");
        }
        let m = Mounted::with(None, &img, &w.path().join(format!("r{point}"))).unwrap();
        // Every file in place holds exactly one version that was written to it...
        let mut present = std::collections::HashMap::new();
        for e in std::fs::read_dir(&m.dir).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            let Some(slot) = name.strip_prefix("f-") else {
                continue;
            };
            let slot: u64 = slot.parse().unwrap();
            let got = std::fs::read(m.dir.join(&name)).unwrap();
            let n = got
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .unwrap_or(u64::MAX);
            assert!(
                n % SLOTS == slot && got == content(n),
                "point {point}: {name} is torn ({} bytes, claims version {n})",
                got.len(),
            );
            present.insert(slot, n);
            checked_files += 1;
        }
        // ...and no older than the last version completed before the freeze instant.
        for (n, at) in &done {
            if *at < instant {
                let have = present.get(&(n % SLOTS)).copied();
                assert!(
                    have.is_some_and(|h| h >= *n),
                    "point {point} (cut at {instant}) holds {have:?} in slot {}, but version {n} was complete at {at}",
                    n % SLOTS
                );
            }
        }
        drop(m);
        let _ = std::fs::remove_file(&img);
    }
    assert!(checked_files > 0);
}

#[test]
fn two_disks_are_cut_at_one_instant() {
    let w = workdir();
    let Some(a) = needs_root("two disks", LoopDev::new(w.path(), "a", 64)) else {
        return;
    };
    let b = LoopDev::new(w.path(), "b", 64).unwrap();
    let ma = Mounted::ext4(&a.dev, &w.path().join("ma"), true).unwrap();
    let mb = Mounted::ext4(&b.dev, &w.path().join("mb"), true).unwrap();
    let rx = Receiver::start(w.path());
    let spec = ebpf_spec("pair", &[("a", &a.dev), ("b", &b.dev)], &[]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let first = wait_point_after(&rx, &agent, "pair", 0);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (da, db, stop) = (ma.dir.clone(), mb.dir.clone(), stop.clone());
        std::thread::spawn(move || {
            // A sequence number, first to disk a, then the same to disk b (each replaced
            // atomically): at any instant a holds b's number or the next.
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                for d in [&da, &db] {
                    let mut f = std::fs::File::create(d.join("seq.tmp")).unwrap();
                    f.write_all(format!("{seq:020}").as_bytes()).unwrap();
                    f.sync_all().unwrap();
                    std::fs::rename(d.join("seq.tmp"), d.join("seq")).unwrap();
                    std::fs::File::open(d).unwrap().sync_all().unwrap();
                }
            }
            seq
        })
    };
    let mut p = first;
    for _ in 0..5 {
        p = wait_point_after(&rx, &agent, "pair", p);
    }
    stop.store(true, Ordering::Relaxed);
    let wrote = writer.join().unwrap();
    agent.kill();
    assert!(wrote > 10);
    let read_seq = |img: &Path, name: &str| -> u64 {
        let m = Mounted::ext4(img, &w.path().join(name), false).unwrap();
        let s = std::fs::read_to_string(m.dir.join("seq")).unwrap_or_default();
        s.trim().parse().unwrap_or(0)
    };
    for point in first + 1..=p {
        let ia = restore(&rx, w.path(), "pair", "a", point);
        let ib = restore(&rx, w.path(), "pair", "b", point);
        let (sa, sb) = (read_seq(&ia, "ra"), read_seq(&ib, "rb"));
        assert!(
            sb <= sa && sa <= sb + 1,
            "point {point}: disk b holds {sb}, disk a {sa}: not one instant"
        );
        let _ = (std::fs::remove_file(ia), std::fs::remove_file(ib));
    }
}

/// Writes `blocks` 4 KiB pieces with O_DIRECT at scattered offsets of a device (each its own
/// request); returns the device's content afterwards.
fn scattered_direct_writes(dev: &Path, count: usize, seed: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let size = std::fs::File::open(dev)
        .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(SECTOR_ALIGN, SECTOR_ALIGN).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: a fresh allocation of `layout` (non-zero size), freed below, used as a slice of
    // exactly its size in between.
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), SECTOR_ALIGN) };
    let mut rng = Rng::new(seed);
    for _ in 0..count {
        rng.fill(buf);
        let off = rng.below(size / SECTOR_ALIGN as u64) * SECTOR_ALIGN as u64;
        f.write_all_at(buf, off).unwrap();
    }
    #[allow(unsafe_code)]
    // SAFETY: allocated above with the same layout.
    unsafe {
        std::alloc::dealloc(buf.as_mut_ptr(), layout)
    };
}

/// Stops the agent cleanly and checks that the newest point restores the device exactly.
fn newest_point_is_the_device(
    rx: &Receiver,
    agent: &mut Agent,
    server: &str,
    disk: &str,
    dev: &Path,
) {
    let p = last_point(rx, server);
    let p = wait_point_after(rx, agent, server, p);
    agent.kill();
    let expected = std::fs::read(dev).unwrap();
    rx.expect_restore(server, disk, &p.to_string(), &expected);
}

#[test]
fn lost_events_force_a_verify_scan_and_nothing_is_missed() {
    let w = workdir();
    let Some(dev) = needs_root("lost events", LoopDev::new(w.path(), "raw", 64)) else {
        return;
    };
    scattered_direct_writes(&dev.dev, 200, 1);
    let rx = Receiver::start(w.path());
    // 4 KiB of ring buffer: about 170 events.
    let spec = ebpf_spec("lossy", &[("raw", &dev.dev)], &["ebpf_ring_buffer_kib = 4"]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let first = wait_point_after(&rx, &agent, "lossy", 0);
    // With the agent stopped nothing drains the ring: most of these events are lost.
    agent.proc.signal(libc::SIGSTOP);
    scattered_direct_writes(&dev.dev, 2000, 2);
    agent.proc.signal(libc::SIGCONT);
    let start = Instant::now();
    while !agent.log_text().contains("lost events") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not notice the lost events:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The cycle in flight at the stop may commit first: its point was cut before the writes
    // (a take drains the ring and would have seen the loss). The scan comes with the next.
    wait_for(
        "a verify scan after the loss",
        Duration::from_secs(60),
        || agent.log_text().matches("verify scan:").count() >= 2,
    );
    let _ = wait_point_after(&rx, &agent, "lossy", first);
    // SIGSTOP/SIGCONT interrupt the tracker's wait on the ring buffer: no failure (it was one).
    assert!(
        !agent.log_text().contains("tracker stopped"),
        "{}",
        agent.log_text()
    );
    newest_point_is_the_device(&rx, &mut agent, "lossy", "raw", &dev.dev);
}

#[test]
fn tracked_writes_discards_and_write_zeroes_replicate_exactly() {
    let w = workdir();
    let Some(dev) = needs_root("discards", LoopDev::new(w.path(), "raw", 64)) else {
        return;
    };
    scattered_direct_writes(&dev.dev, 3000, 3);
    let rx = Receiver::start(w.path());
    let mut spec = ebpf_spec(
        "discard",
        &[("raw", &dev.dev)],
        &["reader_queue_depth = 32"],
    );
    spec.reader = "io_uring";
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let first = wait_point_after(&rx, &agent, "discard", 0);
    let run = |args: &[&str]| {
        let o = Command::new("blkdiscard")
            .args(args)
            .arg(&dev.dev)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "blkdiscard {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["-o", "1048576", "-l", "8388608"]); // discard 8 MiB
    run(&["-z", "-o", "20971520", "-l", "3145728"]); // write zeroes over 3 MiB
    let data = dev.read_all();
    assert!(data[1 << 20..9 << 20].iter().all(|b| *b == 0));
    assert!(data[20 << 20..23 << 20].iter().all(|b| *b == 0));
    scattered_direct_writes(&dev.dev, 100, 4);
    let p = wait_point_after(&rx, &agent, "discard", first);
    let p = wait_point_after(&rx, &agent, "discard", p);
    // No verify scan after the first: the tracker alone found every change.
    assert_eq!(
        agent.log_text().matches("verify scan:").count(),
        1,
        "{}",
        agent.log_text()
    );
    let _ = p;
    newest_point_is_the_device(&rx, &mut agent, "discard", "raw", &dev.dev);
    // The scattered 4 KiB writes went as sub-block deltas.
    assert!(
        rx.counter("discard", "deltas_applied") > 0,
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_partition_is_tracked_at_its_offset() {
    let w = workdir();
    let img = w.path().join("parted.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    // Two partitions: 1 MiB..33 MiB and 33 MiB..95 MiB.
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=65536\nstart=67584, size=126976\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let Some(dev) = needs_root("partitions", LoopDev::attach(&img, true)) else {
        return;
    };
    let p2 = PathBuf::from(format!("{}p2", dev.dev.display()));
    wait_for("the partition device", Duration::from_secs(10), || {
        p2.exists()
    });
    let rx = Receiver::start(w.path());
    // The pread engine, in batches of 3 (the other tests read with io_uring).
    let mut spec = ebpf_spec("parted", &[("p2", &p2)], &["reader_queue_depth = 3"]);
    spec.reader = "pread";
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let _ = wait_point_after(&rx, &agent, "parted", 0);
    scattered_direct_writes(&p2, 500, 5);
    // Writes to the other partition and to the whole disk's first partition are not ours.
    scattered_direct_writes(&PathBuf::from(format!("{}p1", dev.dev.display())), 200, 6);
    newest_point_is_the_device(&rx, &mut agent, "parted", "p2", &p2);
    assert_eq!(agent.log_text().matches("verify scan:").count(), 1);
}

/// A write to `dir` finishes within `within` (the filesystem is not frozen).
fn writable_within(dir: &Path, within: Duration) -> bool {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo x > '{}/after' && sync '{}/after'",
            dir.display(),
            dir.display()
        ))
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < within {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Blocked on a frozen filesystem it cannot die yet: reap it once it does.
    let _ = child.kill();
    std::thread::spawn(move || child.wait());
    false
}

#[test]
fn the_freeze_is_always_thawed() {
    let w = workdir();
    let Some(dev) = needs_root("thaw", LoopDev::new(w.path(), "fs", 64)) else {
        return;
    };
    let mnt = Mounted::ext4(&dev.dev, &w.path().join("mnt"), true).unwrap();
    let rx = Receiver::start(w.path());

    // 1. The agent dies (SIGKILL) while it holds the freeze: the watchdog thaws at once, long
    //    before the 10 s bound.
    let spec = ebpf_spec("thaw", &[("fs", &dev.dev)], &["freeze_timeout_ms = 10000"]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.env = vec![("LIFEBOAT_TEST_HOLD_FREEZE_MS".into(), "60000".into())];
    agent.spawn();
    wait_for("a freeze", Duration::from_secs(60), || {
        agent.log_text().contains("holding the freeze")
    });
    assert!(
        !writable_within(&mnt.dir, Duration::from_millis(500)),
        "not frozen"
    );
    agent.kill();
    assert!(
        writable_within(&mnt.dir, Duration::from_secs(5)),
        "still frozen 5 s after the agent was killed"
    );

    // 2. The agent holds the freeze past the bound: the watchdog thaws at the bound and the
    //    point is best-effort, saying why.
    let spec = ebpf_spec("thaw", &[("fs", &dev.dev)], &["freeze_timeout_ms = 1000"]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.env = vec![("LIFEBOAT_TEST_HOLD_FREEZE_MS".into(), "3000".into())];
    agent.spawn();
    wait_for("a freeze", Duration::from_secs(60), || {
        agent.log_text().matches("holding the freeze").count() >= 2
    });
    assert!(
        writable_within(&mnt.dir, Duration::from_secs(5)),
        "not thawed at the bound"
    );
    let before = last_point(&rx, "thaw");
    let p = wait_point_after(&rx, &agent, "thaw", before);
    agent.kill();
    let pt = rx
        .points("thaw")
        .into_iter()
        .find(|x| x["point"].as_u64() == Some(p))
        .unwrap();
    assert_eq!(pt["consistency"], "best_effort");
    assert!(
        pt["consistency_why"]
            .as_str()
            .unwrap()
            .contains("thawed before"),
        "{pt}"
    );
}

#[test]
fn a_clean_restart_goes_on_tracking_without_a_verify_scan() {
    let w = workdir();
    let Some(dev) = needs_root("restart", LoopDev::new(w.path(), "raw", 64)) else {
        return;
    };
    scattered_direct_writes(&dev.dev, 300, 7);
    let rx = Receiver::start(w.path());
    let spec = ebpf_spec("restart", &[("raw", &dev.dev)], &[]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let first = wait_point_after(&rx, &agent, "restart", 0);
    // Written while the agent runs, then while it is stopped: the pinned program sees both.
    scattered_direct_writes(&dev.dev, 100, 8);
    agent.proc.signal(libc::SIGTERM);
    assert!(agent.wait(), "the agent did not stop cleanly");
    assert!(agent.state_dir.join("tracker.json").exists());
    scattered_direct_writes(&dev.dev, 100, 9);
    agent.spawn();
    let _ = wait_point_after(&rx, &agent, "restart", first);
    let log = agent.log_text();
    assert_eq!(
        log.matches("verify scan:").count(),
        1,
        "a verify scan after a clean restart:\n{log}"
    );
    assert!(log.contains("resumed"), "{log}");
    newest_point_is_the_device(&rx, &mut agent, "restart", "raw", &dev.dev);

    // That agent was killed (SIGKILL): no clean record, so the next start verify-scans, and
    // is exact.
    assert!(!agent.state_dir.join("tracker.json").exists());
    scattered_direct_writes(&dev.dev, 100, 10);
    agent.spawn();
    let _ = wait_point_after(&rx, &agent, "restart", last_point(&rx, "restart"));
    assert_eq!(agent.log_text().matches("verify scan:").count(), 2);
    newest_point_is_the_device(&rx, &mut agent, "restart", "raw", &dev.dev);
}

/// The receiver loses a block (bit rot, quarantined by scrub) under a tracking agent: the
/// agent adopts the receiver's manifest and must find the block again itself, since no write
/// will mark it. (The eBPF agent used to adopt the manifest and never read the block again.)
#[test]
fn a_block_the_receiver_lost_is_sent_again_by_a_tracking_agent() {
    let w = workdir();
    let Some(dev) = needs_root("lost block", LoopDev::new(w.path(), "raw", 16)) else {
        return;
    };
    scattered_direct_writes(&dev.dev, 400, 11);
    let rx = Receiver::start(w.path());
    let spec = ebpf_spec("heal", &[("raw", &dev.dev)], &[]);
    let mut agent = Agent::new(w.path(), &rx, &spec);
    agent.spawn();
    let first = wait_point_after(&rx, &agent, "heal", 0);
    let victim = rx.store_blocks()[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let o = rx.cli(&["scrub"]);
    assert_eq!(o.status.code(), Some(65));
    let p = wait_point_after(&rx, &agent, "heal", first);
    let _ = wait_point_after(&rx, &agent, "heal", p);
    newest_point_is_the_device(&rx, &mut agent, "heal", "raw", &dev.dev);
    let o = rx.cli(&["scrub"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
