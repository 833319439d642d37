//! Shared fixtures for the integration tests: a real receiver and real agents as child
//! processes (the built binaries), generated disk images, and a raw TLS client for sending
//! hostile input. Every server a test starts listens on 127.0.0.1 and is killed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod ebs_server;
pub mod moto;
pub mod s3_server;
pub mod slowdown;

use lifeboat_common::BLOCK_SIZE;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A built binary of this workspace (`cargo build --workspace --bins` first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (tests/run.sh does)",
        p.display()
    );
    p
}

/// A directory on a real filesystem (O_DIRECT-capable, unlike tmpfs).
pub fn workdir() -> tempfile::TempDir {
    let base = std::env::var_os("LIFEBOAT_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/deps/<test> → target/lifeboat-test-tmp
            exe.ancestors().nth(3).unwrap().join("lifeboat-test-tmp")
        });
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `cond`, polling; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process with its output appended to a log file; killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    /// Started as a process group of its own, killed as one (see [`Proc::start_group`]).
    group: bool,
}

impl Proc {
    pub fn new(log: PathBuf) -> Proc {
        Proc {
            child: None,
            log,
            group: false,
        }
    }

    /// As [`Proc::start`], in a process group of its own that [`Proc::kill`] kills whole: a
    /// wrapper such as `faketime` forks the command, which would outlive the wrapper. (Not
    /// for the agent: its thaw watchdog must outlive it.)
    pub fn start_group(&mut self, mut cmd: Command) {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.start(cmd);
        self.group = true;
    }

    /// Starts `cmd` with stdout and stderr appended to the log.
    pub fn start(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        self.group = false;
    }

    /// SIGKILL, to the process and everything it started: no chance to save anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Only a child not yet reaped still owns its pid (and so its group's id): one
            // reaped earlier (`is_running`) may have handed it to another test's process.
            let alive = matches!(c.try_wait(), Ok(None));
            if self.group && alive {
                #[allow(unsafe_code)]
                // SAFETY: kill(2) on the process group our child leads; no memory is involved.
                unsafe {
                    libc::kill(-(c.id() as i32), libc::SIGKILL);
                }
            }
            let _ = c.kill();
            if self.group && alive {
                // A `faketime` wrapper (exec'd in place of `env`, so with our child's pid)
                // killed before it could clean up leaves its semaphore and shared memory
                // behind, and a later faketime given the same pid refuses to start. Removed
                // while the unreaped child still holds the pid.
                for f in ["faketime_shm_", "sem.faketime_sem_"] {
                    let _ = std::fs::remove_file(format!("/dev/shm/{f}{}", c.id()));
                }
            }
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself; true when it exited 0.
    pub fn wait(&mut self) -> bool {
        self.child
            .take()
            .is_some_and(|mut c| c.wait().unwrap().success())
    }

    /// After the process exited by itself: reap it so that it may be started again.
    pub fn forget(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends a signal (SIGSTOP to hang it, SIGCONT to resume, SIGTERM to stop it).
    /// Waits up to `timeout` for the process to exit by itself: whether it exited
    /// successfully, or `None` if it still runs.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<bool> {
        let start = Instant::now();
        loop {
            let c = self.child.as_mut()?;
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return Some(status.success());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("not running").id() as i32;
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(r, 0, "kill({pid}, {sig}) failed");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Receiver {
    pub dir: PathBuf,
    pub port: u16,
    pub fingerprint: String,
    pub token: String,
    pub proc: Proc,
    /// Seconds between retention/GC passes of `serve`.
    pub gc_interval_secs: u64,
    /// Extra environment for `serve` (e.g. LIFEBOAT_LOG).
    pub env: Vec<(String, String)>,
    /// A command `serve` is started through (e.g. `faketime`), with its arguments.
    pub wrapper: Vec<String>,
    /// Extra arguments for `serve`.
    pub serve_args: Vec<String>,
}

impl Receiver {
    /// `init` a state dir under `root` and start `serve`.
    pub fn start(root: &Path) -> Receiver {
        Receiver::start_at(root, &root.join("receiver"))
    }

    /// As [`Receiver::start`], with the state dir at `dir` (the log stays under `root`).
    pub fn start_at(root: &Path, dir: &Path) -> Receiver {
        let dir = dir.to_path_buf();
        let port = free_port();
        let out = Command::new(bin("lifeboat-receiver"))
            .args(["--state-dir"])
            .arg(&dir)
            .args(["init", "--json", "--listen", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut r = Receiver {
            fingerprint: v["ca_fingerprint"].as_str().unwrap().to_string(),
            token: v["token"].as_str().unwrap().to_string(),
            proc: Proc::new(root.join("receiver.log")),
            dir,
            port,
            gc_interval_secs: 3600,
            env: Vec::new(),
            wrapper: Vec::new(),
            serve_args: Vec::new(),
        };
        // Many receivers run at once: each metrics endpoint on a port of its own.
        r.set_config("metrics_listen", "\"127.0.0.1:0\"");
        r.restart();
        r
    }

    /// Where `serve` serves `/metrics` and `/healthz` (it writes the bound address).
    pub fn metrics_addr(&self) -> String {
        let p = self.dir.join("metrics.addr");
        wait_for(
            "the receiver's metrics address",
            Duration::from_secs(30),
            || p.exists(),
        );
        std::fs::read_to_string(p).unwrap()
    }

    pub fn restart(&mut self) {
        let mut cmd = match self.wrapper.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(bin("lifeboat-receiver"));
                c
            }
            None => Command::new(bin("lifeboat-receiver")),
        };
        cmd.arg("--state-dir").arg(&self.dir).args([
            "serve",
            "--gc-interval-secs",
            &self.gc_interval_secs.to_string(),
        ]);
        cmd.args(&self.serve_args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // The last run's address must not be read for this one's (serve rewrites it only
        // after its TLS listener is up, which is all `restart` waits for).
        let _ = std::fs::remove_file(self.dir.join("metrics.addr"));
        self.proc.start_group(cmd);
        let port = self.port;
        let started = std::time::Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(30) || !self.proc.is_running() {
                panic!(
                    "the receiver did not come to listen on port {port}; its log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn forget(&mut self) {
        self.proc.forget();
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Sets a top-level key of `receiver.toml` (replacing it if present) and restarts the
    /// receiver when it was running.
    pub fn set_config(&mut self, key: &str, value: &str) {
        let path = self.dir.join("receiver.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with(&format!("{key} =")))
            .map(str::to_string)
            .collect();
        // Before the first table, where top-level keys belong.
        lines.insert(0, format!("{key} = {value}"));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        if self.proc.is_running() {
            self.proc.kill();
            self.restart();
        }
    }

    /// Sets `key = value` in `[s3]` of receiver.toml (stopped; see [`Receiver::use_s3`]).
    pub fn set_s3(&mut self, key: &str, value: &str) {
        let path = self.dir.join("receiver.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n[s3]\n"), "no [s3] in receiver.toml");
        let text = text.replacen("\n[s3]\n", &format!("\n[s3]\n{key} = {value}\n"), 1);
        std::fs::write(&path, text).unwrap();
    }

    /// Restarts with the given retention (`recent_minutes`, `daily_days`, `gc_grace_minutes`)
    /// and a retention/GC pass every second.
    pub fn restart_with_retention(&mut self, recent_minutes: u64, daily_days: u64, grace: u64) {
        self.proc.kill();
        let path = self.dir.join("receiver.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let set = |line: &str| {
            let key = line.split('=').next().unwrap_or("").trim();
            match key {
                "recent_minutes" => format!("recent_minutes = {recent_minutes}"),
                "daily_days" => format!("daily_days = {daily_days}"),
                "gc_grace_minutes" => format!("gc_grace_minutes = {grace}"),
                _ => line.to_string(),
            }
        };
        let text: Vec<String> = text.lines().map(set).collect();
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
        self.gc_interval_secs = 1;
        self.restart();
    }

    /// Waits until `servers` lists `server` as disconnected (its session has ended).
    pub fn wait_disconnected(&self, server: &str) {
        wait_for(
            &format!("server {server} to show disconnected"),
            Duration::from_secs(150),
            || {
                let o = self.cli(&["servers", "--json"]);
                let v: Value = serde_json::from_slice(&o.stdout).unwrap();
                v.as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["server"] == server && s["connected"] == false)
            },
        );
    }

    /// Runs a receiver CLI command against this state dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("lifeboat-receiver"))
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    /// Points this receiver's EBS target at a test server (`[ebs]` appended to receiver.toml
    /// with `extra` lines), with static test credentials and no instance metadata lookups.
    /// Restarts `serve` when it was running.
    pub fn use_ebs(&mut self, url: &str, extra: &[&str]) {
        let path = self.dir.join("receiver.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n\
             max_attempts = 4\nattempt_timeout_secs = 5\n"
        ));
        for l in extra {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        self.use_test_credentials();
    }

    /// Static test credentials, no instance metadata lookups; restarts `serve` when it was
    /// running so that it takes them (and the configuration just written).
    fn use_test_credentials(&mut self) {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "lifeboat-test"),
            ("AWS_SECRET_ACCESS_KEY", "lifeboat-test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ] {
            if !self.env.iter().any(|(key, _)| key == k) {
                self.env.push((k.to_string(), v.to_string()));
            }
        }
        if self.proc.is_running() {
            self.proc.kill();
            self.restart();
        }
    }

    /// Puts this receiver's staging store in `bucket` of an S3 server at `endpoint`
    /// (`[s3]` appended to receiver.toml, path-style), with static test credentials.
    /// Restarts `serve` when it was running.
    pub fn use_s3(&mut self, endpoint: &str, bucket: &str, prefix: &str) {
        let path = self.dir.join("receiver.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[s3]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nregion = \"us-east-1\"\n\
             endpoint_url = \"{endpoint}\"\npath_style = true\nmax_attempts = 4\n\
             attempt_timeout_secs = 10\n"
        ));
        std::fs::write(&path, text).unwrap();
        self.use_test_credentials();
    }

    /// Gives this receiver (stopped) `like`'s CA, server certificate and tokens: agents trust
    /// one CA for a whole fleet.
    pub fn share_ca_with(&mut self, like: &Receiver) {
        for f in [
            "tls/ca.pem",
            "tls/ca.key",
            "tls/server.pem",
            "tls/server.key",
            "tokens",
        ] {
            std::fs::copy(like.dir.join(f), self.dir.join(f)).unwrap();
        }
        self.fingerprint = like.fingerprint.clone();
        self.token = like.token.clone();
    }

    /// Makes this receiver (stopped) a member of the fleet on `bucket` of the S3 server at
    /// `endpoint` (prefix "fleet/"), with its own address and `lease_secs`. Starts nothing.
    pub fn join_fleet(&mut self, endpoint: &str, bucket: &str, lease_secs: u64) {
        self.use_s3(endpoint, bucket, "fleet/");
        let path = self.dir.join("receiver.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[fleet]\naddress = \"127.0.0.1:{}\"\nlease_seconds = {lease_secs}\n",
            self.port
        ));
        std::fs::write(&path, text).unwrap();
    }

    pub fn points(&self, server: &str) -> Vec<Value> {
        let out = self.cli(&["points", "--server", server, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// The receiver's cumulative counters for a server (from its status file).
    pub fn counters(&self, server: &str) -> Value {
        let p = self.dir.join("servers").join(server).join("status.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice::<Value>(&b).unwrap()["counters"].clone(),
            Err(_) => Value::Null,
        }
    }

    /// A counter of the server's status; panics when the status or the counter is missing
    /// (a renamed or lost counter must not read as 0).
    pub fn counter(&self, server: &str, name: &str) -> u64 {
        self.try_counter(server, name).unwrap_or_else(|| {
            panic!(
                "server {server} has no counter {name:?}: {}",
                self.counters(server)
            )
        })
    }

    /// A counter, or `None` before the receiver first saved the server's status.
    pub fn try_counter(&self, server: &str, name: &str) -> Option<u64> {
        self.counters(server)[name].as_u64()
    }

    /// Restores a disk of a point to `to`; returns the command's output.
    pub fn restore(&self, server: &str, disk: &str, point: &str, to: &Path) -> Output {
        self.restore_with(server, disk, point, to, &[])
    }

    /// As [`Receiver::restore`], with extra arguments (e.g. `--force`).
    pub fn restore_with(
        &self,
        server: &str,
        disk: &str,
        point: &str,
        to: &Path,
        extra: &[&str],
    ) -> Output {
        let mut args = vec![
            "restore",
            "--server",
            server,
            "--disk",
            disk,
            "--point",
            point,
            "--to",
            to.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.cli(&args)
    }

    /// Restores a disk of a point to a new file and checks it holds exactly `expected`.
    pub fn expect_restore(&self, server: &str, disk: &str, point: &str, expected: &[u8]) {
        let out = std::env::temp_dir().join(format!(
            "lifeboat-restore-{}-{server}-{disk}-{point}-{}",
            std::process::id(),
            Rng::new(now_nanos()).next_u64()
        ));
        let o = self.restore(server, disk, point, &out);
        let got = std::fs::read(&out);
        let _ = std::fs::remove_file(&out);
        assert!(
            o.status.success(),
            "restore {server}/{disk} point {point}: {}",
            stderr(&o)
        );
        assert!(
            got.unwrap() == expected,
            "{server}/{disk} point {point} restored different bytes"
        );
    }

    pub fn store_blocks(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.dir.join("store/blocks");
        for sub in std::fs::read_dir(root).unwrap().flatten() {
            for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
        out
    }
}

pub struct AgentSpec {
    pub server_id: String,
    pub disks: Vec<(String, PathBuf)>,
    pub reader: &'static str,
    pub bandwidth_mbps: u64,
    pub interval_secs: u64,
    pub token: Option<String>,
    /// `[receiver] timeout_secs`.
    pub timeout_secs: u64,
    /// More top-level lines of agent.toml (`tracker = "ebpf"`, ...).
    pub extra: Vec<String>,
    /// More receivers of a fleet (`[receiver] addresses`, host:port each).
    pub more_receivers: Vec<String>,
}

impl AgentSpec {
    pub fn new(server_id: &str, disks: &[(&str, &Path)]) -> AgentSpec {
        AgentSpec {
            server_id: server_id.into(),
            disks: disks
                .iter()
                .map(|(i, p)| (i.to_string(), p.to_path_buf()))
                .collect(),
            reader: "auto",
            bandwidth_mbps: 0,
            interval_secs: 1,
            token: None,
            timeout_secs: 120,
            extra: Vec::new(),
            more_receivers: Vec::new(),
        }
    }
}

pub struct Agent {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub proc: Proc,
    /// Extra environment for `run` in the background.
    pub env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(root: &Path, rx: &Receiver, spec: &AgentSpec) -> Agent {
        let state_dir = root.join(format!("agent-{}", spec.server_id));
        let mut toml = spec.extra.join("\n") + "\n";
        if !spec.extra.iter().any(|l| l.starts_with("metrics_listen")) {
            // Many agents run at once: each metrics endpoint on a port of its own.
            toml += "metrics_listen = \"127.0.0.1:0\"\n";
        }
        toml += &format!(
            "server_id = \"{}\"\nstate_dir = \"{}\"\npoint_interval_secs = {}\nbandwidth_limit_mbps = {}\nreader = \"{}\"\n\n[receiver]\naddress = \"127.0.0.1:{}\"\nca_fingerprint = \"{}\"\ntoken = \"{}\"\ntimeout_secs = {}\n",
            spec.server_id,
            state_dir.display(),
            spec.interval_secs,
            spec.bandwidth_mbps,
            spec.reader,
            rx.port,
            rx.fingerprint,
            spec.token.clone().unwrap_or_else(|| rx.token.clone()),
            spec.timeout_secs,
        );
        if !spec.more_receivers.is_empty() {
            toml += &format!("addresses = {:?}\n", spec.more_receivers);
        }
        for (id, p) in &spec.disks {
            toml.push_str(&format!(
                "\n[[disks]]\nid = \"{id}\"\npath = \"{}\"\n",
                p.display()
            ));
        }
        let config = root.join(format!("agent-{}.toml", spec.server_id));
        std::fs::write(&config, toml).unwrap();
        Agent {
            config,
            state_dir,
            proc: Proc::new(root.join(format!("agent-{}.log", spec.server_id))),
            env: Vec::new(),
        }
    }

    /// Enrols this agent at `rx`: a one-time code from `lifeboat-receiver enroll`, used by
    /// `lifeboat-agent enroll --code`. Panics with both commands' words if either fails.
    pub fn enroll(&self, rx: &Receiver, server_id: &str) {
        let o = rx.cli(&["enroll", "--server", server_id, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let code = v["code"].as_str().unwrap();
        let o = Command::new(bin("lifeboat-agent"))
            .args(["enroll", "--config"])
            .arg(&self.config)
            .args(["--code", code])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    /// `run --once`: sync and cut one point; returns the process output.
    pub fn run_once(&self, give_up_secs: u64) -> Output {
        self.run_once_wrapped(&[], give_up_secs)
    }

    /// As [`Agent::run_once`], with the agent started through `wrapper` (e.g. `faketime`).
    pub fn run_once_wrapped(&self, wrapper: &[&str], give_up_secs: u64) -> Output {
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin("lifeboat-agent"));
                c
            }
            None => Command::new(bin("lifeboat-agent")),
        };
        cmd.args([
            "run",
            "--once",
            "--give-up-after-secs",
            &give_up_secs.to_string(),
            "--config",
        ])
        .arg(&self.config)
        .output()
        .unwrap()
    }

    pub fn run_once_ok(&self) {
        let out = self.run_once(120);
        assert!(
            out.status.success(),
            "agent --once failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts continuous replication in the background.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(bin("lifeboat-agent"));
        cmd.args(["run", "--config"]).arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc.start(cmd);
    }

    /// Starts `run --once` in the background (to be killed, or waited for with
    /// [`Agent::wait`]).
    pub fn spawn_once(&mut self) {
        let mut cmd = Command::new(bin("lifeboat-agent"));
        cmd.args(["run", "--once", "--give-up-after-secs", "120", "--config"])
            .arg(&self.config);
        self.proc.start(cmd);
    }

    /// Waits for a background agent to exit; true when it exited 0.
    pub fn wait(&mut self) -> bool {
        self.proc.wait()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Where the running agent serves `/metrics` and `/healthz`.
    pub fn metrics_addr(&self) -> String {
        let p = self.state_dir.join("metrics.addr");
        wait_for(
            "the agent's metrics address",
            Duration::from_secs(30),
            || p.exists(),
        );
        std::fs::read_to_string(p).unwrap()
    }

    /// The agent's own status file.
    pub fn status(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state_dir.join("status.json")).unwrap()).unwrap()
    }
}

impl Drop for Agent {
    /// The agent leaves its eBPF tracker pinned (it tracks on while the agent is stopped):
    /// detach it, as an uninstall would.
    fn drop(&mut self) {
        self.proc.kill();
        let _ = Command::new(bin("lifeboat-agent"))
            .args(["untrack", "--config"])
            .arg(&self.config)
            .output();
    }
}

/// `GET path` from an HTTP server at `addr` (host:port): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (code, body) = http_request(addr, "GET", path, &[], &[]);
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// One HTTP/1.0 request (so that no server answers in chunks): the status code and the body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nhost: {addr}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out[(split + 4).min(out.len())..].to_vec())
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `lifeboat_agent_backlog_bytes{disk="root"}`) in a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A deterministic generator (xorshift), so images are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The kinds of block a generated image mixes.
pub fn block_of_kind(kind: u64, rng: &mut Rng, shared: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    match kind % 4 {
        0 => {} // zeros
        1 => rng.fill(&mut b),
        2 => {
            let line = format!(
                "log line {} lifeboat replicates every byte\n",
                rng.next_u64()
            );
            for (i, c) in b.iter_mut().enumerate() {
                *c = line.as_bytes()[i % line.len()];
            }
        }
        _ => b.copy_from_slice(shared), // duplicated block
    }
    b
}

/// Writes an image of `blocks` blocks (the last one cut short by `tail_cut` bytes) mixing
/// zeros, random data, text and duplicated blocks.
pub fn make_image(path: &Path, blocks: usize, tail_cut: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut shared = vec![0u8; BLOCK_SIZE];
    rng.fill(&mut shared);
    let mut data = Vec::with_capacity(blocks * BLOCK_SIZE);
    for _ in 0..blocks {
        let kind = rng.below(4);
        data.extend_from_slice(&block_of_kind(kind, &mut rng, &shared));
    }
    data.truncate(data.len() - tail_cut);
    std::fs::write(path, &data).unwrap();
    data
}

/// Changes some blocks in place: rewrites, zeroes, duplicates. Returns the new content.
pub fn mutate(path: &Path, seed: u64, changes: usize) -> Vec<u8> {
    let mut data = std::fs::read(path).unwrap();
    let mut rng = Rng::new(seed);
    let blocks = data.len().div_ceil(BLOCK_SIZE);
    for _ in 0..changes {
        let i = rng.below(blocks as u64) as usize;
        let start = i * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(data.len());
        match rng.below(3) {
            0 => data[start..end].fill(0),
            1 => {
                // A small in-place edit, like a database page write.
                let off = start + rng.below((end - start) as u64) as usize;
                data[off] = data[off].wrapping_add(1);
            }
            _ => {
                let j = rng.below(blocks as u64) as usize * BLOCK_SIZE;
                let src: Vec<u8> = data[j..(j + BLOCK_SIZE).min(data.len())].to_vec();
                let n = src.len().min(end - start);
                data[start..start + n].copy_from_slice(&src[..n]);
            }
        }
    }
    // In place, as a disk is written: never truncated under a scanning agent.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&data, 0).unwrap();
    data
}

/// Distinct non-zero blocks of an image.
/// Writes `blocks` blocks of incompressible data to `path` (so a bandwidth limit makes a sync
/// last long enough to interrupt); returns them.
pub fn random_image(path: &Path, blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; blocks * BLOCK_SIZE];
    rng.fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

pub fn unique_data_blocks(data: &[u8]) -> usize {
    let mut set = std::collections::HashSet::new();
    for c in data.chunks(BLOCK_SIZE) {
        let h = lifeboat_common::block::hash_block(c);
        if !h.is_zero() {
            set.insert(h);
        }
    }
    set.len()
}

/// A raw TLS client for sending what no agent would: it trusts the receiver's pinned CA, and
/// lets the test write any bytes.
pub struct RawClient {
    pub stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl RawClient {
    pub fn connect(rx: &Receiver) -> RawClient {
        let pin = lifeboat_common::config::parse_fingerprint(&rx.fingerprint).unwrap();
        let cfg: Arc<rustls::ClientConfig> = lifeboat_agent::tls::client_config(pin, None).unwrap();
        let name = rustls::pki_types::ServerName::try_from("lifeboat-receiver").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", rx.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawClient {
            stream: rustls::StreamOwned::new(conn, tcp),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Reads frames until the connection closes or `n` frames arrived.
    pub fn read_frames(&mut self, n: usize) -> Vec<lifeboat_common::protocol::Message> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut chunk = [0u8; 65536];
        while out.len() < n {
            match lifeboat_common::protocol::decode_frame(&buf) {
                Ok(Some((m, used))) => {
                    buf.drain(..used);
                    out.push(m);
                    continue;
                }
                Ok(None) => {}
                Err(e) => panic!("receiver sent a malformed frame: {e}"),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        out
    }

    /// Sends the preface and reads the receiver's.
    pub fn preface(&mut self) {
        self.send(&lifeboat_common::protocol::preface(
            lifeboat_common::protocol::PROTOCOL_VERSION,
        ))
        .unwrap();
        let mut p = [0u8; 12];
        self.stream.read_exact(&mut p).unwrap();
        assert_eq!(&p[..8], b"LIFEBOAT");
    }
}

/// A `Hello` frame for server `server` from machine `instance` (16 hex digits, as an agent's
/// instance id is), as a raw client sends it.
pub fn hello_frame(server: &str, token: &str, instance: &str) -> Vec<u8> {
    let mut out = Vec::new();
    lifeboat_common::protocol::Message::Hello {
        server_id: server.into(),
        token: token.into(),
        agent_version: "test".into(),
        instance: instance.into(),
        hostname: "raw-client".into(),
    }
    .encode(&mut out);
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    /// Attaches `file`; `None` (with the reason printed) when loop devices cannot be used here
    /// (not root, or no losetup): the callers then say so loudly rather than pass silently.
    pub fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A small ext4 filesystem on a loop device, mounted under `root`, unmounted on drop: for
/// running out of space for real.
pub struct SmallFs {
    pub dir: PathBuf,
    /// The image file the loop device writes to: what a disk would hold after a power cut.
    pub img: PathBuf,
}

/// Runs a command; its stderr as the error.
fn run_ok(c: &mut Command) -> Result<(), String> {
    c.output().map_err(|e| e.to_string()).and_then(|o| {
        if o.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    })
}

impl SmallFs {
    pub fn new(root: &Path, mib: u64) -> Result<SmallFs, String> {
        SmallFs::with_options(root, "smallfs", mib, "defaults")
    }

    /// A new `mib`-MiB ext4 image `<root>/<name>.img`, mounted at `<root>/<name>` with
    /// `options`.
    pub fn with_options(
        root: &Path,
        name: &str,
        mib: u64,
        options: &str,
    ) -> Result<SmallFs, String> {
        let img = root.join(format!("{name}.img"));
        let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(mib << 20).map_err(|e| e.to_string())?;
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
        SmallFs::mount(root, name, &img, options)
    }

    /// Mounts an existing image (ext4 replays its journal, as after a power cut).
    pub fn mount(root: &Path, name: &str, img: &Path, options: &str) -> Result<SmallFs, String> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("loop,{options}")])
                .arg(img)
                .arg(&dir),
        )?;
        Ok(SmallFs {
            dir,
            img: img.to_path_buf(),
        })
    }

    /// Fills the filesystem with a ballast file until only `leave_mib` remain free.
    pub fn fill_leaving(&self, leave_mib: u64) -> PathBuf {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.dir)
            .output()
            .unwrap();
        let avail: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let ballast = self.dir.join("ballast");
        let size = avail.saturating_sub(leave_mib << 20);
        let o = Command::new("fallocate")
            .args(["-l", &size.to_string()])
            .arg(&ballast)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "fallocate: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ballast
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let clean = Command::new("umount")
            .arg(&self.dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !clean {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        }
    }
}

/// A loop device over an image file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
    pub img: PathBuf,
}

impl LoopDev {
    /// Attaches `img` (with `-P`: its partitions get devices too).
    pub fn attach(img: &Path, partitions: bool) -> Result<LoopDev, String> {
        let mut c = Command::new("losetup");
        c.args(["-f", "--show"]);
        if partitions {
            c.arg("-P");
        }
        let o = c.arg(img).output().map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if partitions {
            // Where the kernel's own scan finds nothing (no partition-table support built
            // in), add them from user space; harmless when they exist already.
            let _ = Command::new("partx").arg("-a").arg(&dev).output();
        }
        Ok(LoopDev {
            dev,
            img: img.to_path_buf(),
        })
    }

    /// A new sparse image of `mib` MiB under `dir`, attached.
    pub fn new(dir: &Path, name: &str, mib: u64) -> Result<LoopDev, String> {
        let img = dir.join(format!("{name}.img"));
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| e.to_string())?;
        LoopDev::attach(&img, false)
    }

    /// The whole device's content.
    pub fn read_all(&self) -> Vec<u8> {
        std::fs::read(&self.dev).unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

/// A filesystem mounted from a device at `dir`, unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
}

impl Mounted {
    /// `mkfs.ext4` on `dev` (with `mkfs`), then mount it at `dir`.
    pub fn ext4(dev: &Path, dir: &Path, mkfs: bool) -> Result<Mounted, String> {
        Mounted::with(if mkfs { Some("ext4") } else { None }, dev, dir)
    }

    /// Makes a `fstype` filesystem (ext4 or xfs) on `dev` if asked, then mounts it at `dir`.
    pub fn with(mkfs: Option<&str>, dev: &Path, dir: &Path) -> Result<Mounted, String> {
        match mkfs {
            Some("xfs") => run_ok(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(dev))?,
            Some("btrfs") => run_ok(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(dev))?,
            Some(fs) => run_ok(
                Command::new(format!("mkfs.{fs}"))
                    .args(["-q", "-F"])
                    .arg(dev),
            )?,
            None => {}
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut c = Command::new("mount");
        let fstype = Command::new("blkid")
            .args(["-o", "value", "-s", "TYPE"])
            .arg(dev)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if mkfs.is_none() && fstype == "xfs" {
            // A copy of a mounted XFS has its UUID: XFS refuses it without `nouuid`.
            c.args(["-o", "nouuid"]);
        }
        if mkfs.is_none() && fstype == "btrfs" {
            // A copy of a mounted btrfs has its fsid, which btrfs would take for the same
            // filesystem: give the copy its own first.
            run_ok(Command::new("btrfstune").args(["-f", "-u"]).arg(dev))?;
        }
        run_ok(c.arg(dev).arg(dir))?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
    }
}

/// For tests that need root, loop devices and real eBPF: `Err` → in CI a failure, elsewhere
/// a loud skip (returns None).
pub fn needs_root<T>(what: &str, r: Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{what} needs root, loop devices and eBPF in CI: {why}"
            );
            eprintln!("SKIPPED (loudly): {what}: {why}");
            None
        }
    }
}
