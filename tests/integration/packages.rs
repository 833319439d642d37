//! The .deb packages: built from the binaries under test, installed with dpkg, checked,
//! purged. (Root and dpkg needed; CI has both.)

use lifeboat_tests::*;
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Purges both packages when dropped, so a failing test leaves nothing installed (and the
/// service user, which a purge keeps, when the test made it).
struct Installed {
    made_user: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "lifeboat-agent", "lifeboat-receiver"])
            .output();
        if self.made_user {
            let _ = Command::new("userdel").arg("lifeboat-receiver").output();
        }
    }
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Processes running one of the installed binaries.
fn running_installed() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
            if exe.starts_with("/usr/bin/lifeboat-") {
                out.push(format!(
                    "{} {}",
                    e.file_name().to_string_lossy(),
                    exe.display()
                ));
            }
        }
    }
    out
}

#[test]
fn packages_install_validate_start_nothing_and_purge_cleanly() {
    let is_root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !is_root || !have("dpkg") || !cargo_deb {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs root, dpkg and cargo-deb (tests/run.sh installs cargo-deb)"
        );
        eprintln!("SKIPPED (loudly): the package test needs root, dpkg and cargo-deb");
        return;
    }
    for p in ["lifeboat-agent", "lifeboat-receiver"] {
        let installed = Command::new("dpkg").args(["-s", p]).output().unwrap();
        assert!(
            !installed.status.success(),
            "{p} is installed on this machine; the package test would purge it"
        );
    }
    for leftover in [
        "/etc/lifeboat",
        "/var/lib/lifeboat",
        "/usr/bin/lifeboat-agent",
        "/usr/bin/lifeboat-receiver",
    ] {
        assert!(
            !Path::new(leftover).exists(),
            "{leftover} exists: this machine has Lifeboat installed; the package test would \
             purge it (dpkg --purge lifeboat-agent lifeboat-receiver, then run again)"
        );
    }
    let w = workdir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The binaries under test: …/<target>/debug/lifeboat-agent.
    let target = bin("lifeboat-agent")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let out = w.path().join("debs");
    run(Command::new("bash")
        .arg(root.join("packaging/deb/build.sh"))
        .env("PROFILE", "dev")
        .env("NO_BUILD", "1")
        .env("OUT", &out)
        .env("CARGO_TARGET_DIR", &target));
    let debs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 2, "{debs:?}");

    let _guard = Installed {
        made_user: !user_exists("lifeboat-receiver"),
    };
    let said = run(Command::new("dpkg").arg("-i").args(&debs));
    assert!(
        said.contains("lifeboat-agent installed. Edit /etc/lifeboat/agent.toml"),
        "{said}"
    );
    assert!(
        said.contains("lifeboat-receiver installed. Run 'lifeboat-receiver init'"),
        "{said}"
    );
    for f in [
        "/usr/bin/lifeboat-agent",
        "/usr/bin/lifeboat-receiver",
        "/lib/systemd/system/lifeboat-agent.service",
        "/lib/systemd/system/lifeboat-receiver.service",
        "/usr/share/man/man1/lifeboat-agent.1",
        "/usr/share/man/man1/lifeboat-receiver-restore.1",
        "/usr/share/bash-completion/completions/lifeboat-receiver",
        "/usr/share/zsh/vendor-completions/_lifeboat-agent",
        "/usr/share/fish/vendor_completions.d/lifeboat-receiver.fish",
        "/usr/share/doc/lifeboat-receiver/prometheus/lifeboat-rules.yml",
        "/usr/share/doc/lifeboat-receiver/examples/iam-policy.json",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode("/etc/lifeboat/agent.toml"),
        0o600,
        "the agent's config holds its token"
    );
    assert_eq!(mode("/var/lib/lifeboat"), 0o700);
    assert!(
        user_exists("lifeboat-receiver"),
        "the service user was not made"
    );
    let conffiles =
        run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "lifeboat-agent"]));
    assert!(
        conffiles.contains("/etc/lifeboat/agent.toml"),
        "{conffiles}"
    );

    // The installed binaries work, on the shipped configs.
    run(Command::new("/usr/bin/lifeboat-agent").args([
        "validate",
        "--file-only",
        "--config",
        "/etc/lifeboat/agent.toml",
    ]));
    let state = w.path().join("rx");
    run(Command::new("/usr/bin/lifeboat-receiver")
        .arg("--state-dir")
        .arg(&state)
        .args(["init", "--listen", "127.0.0.1:0"]));
    std::fs::copy(
        "/usr/share/doc/lifeboat-receiver/examples/receiver.toml.example",
        state.join("receiver.toml"),
    )
    .unwrap();
    run(Command::new("/usr/bin/lifeboat-receiver")
        .arg("--state-dir")
        .arg(&state)
        .arg("validate"));
    // Installing started nothing.
    assert_eq!(running_installed(), Vec::<String>::new());

    // Purged: every file the packages brought, the agent's state and config directories; the
    // receiver's replicas are never the package's to delete.
    let said = run(Command::new("dpkg").args(["--purge", "lifeboat-agent", "lifeboat-receiver"]));
    for gone in [
        "/usr/bin/lifeboat-agent",
        "/usr/bin/lifeboat-receiver",
        "/lib/systemd/system/lifeboat-agent.service",
        "/usr/share/man/man1/lifeboat-agent.1",
        "/etc/lifeboat",
        "/var/lib/lifeboat",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge: {said}");
    }
    let o = Command::new("dpkg")
        .args(["-s", "lifeboat-agent"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "still known to dpkg: {}", stdout(&o));
}
