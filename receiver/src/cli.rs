//! The command line. `main.rs` parses it and calls [`run`], which maps errors to exit codes.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Exit codes: 0 success, 1 failure, 2 bad usage, 64 bad configuration, 65 data error (a
/// missing or corrupt block, a manifest that does not check).
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const CONFIG: u8 = 64;
    pub const DATA: u8 = 65;
}

#[derive(Parser, Debug)]
#[command(
    name = "lifeboat-receiver",
    version,
    about = "Lifeboat receiver: keeps replicated disks durable, cuts points in time, restores them",
    long_about = "Lifeboat receiver: keeps replicated disks durable, cuts points in time, restores them.\n\n\
First run `init` once to create the state directory, a private CA and an agent token; then \
`serve` (usually as the systemd unit lifeboat-receiver.service). `servers`, `points` and \
`restore` read the same state directory and can run while `serve` does."
)]
pub struct Cli {
    /// The receiver's state directory (config, TLS material, staging store, catalog).
    #[arg(
        long,
        global = true,
        env = "LIFEBOAT_RECEIVER_STATE_DIR",
        default_value = "/var/lib/lifeboat-receiver"
    )]
    pub state_dir: PathBuf,
    /// Log filter (RUST_LOG syntax), e.g. "info" or "lifeboat_receiver=debug".
    #[arg(long, global = true, env = "LIFEBOAT_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the state directory, a CA, a server certificate and an agent token; print what
    /// an agent's config needs.
    Init {
        /// Address the listener will bind.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
        /// Extra DNS names or IP addresses for the server certificate (agents connect with
        /// server_name "lifeboat-receiver" by default, which is always included).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the TLS listener until SIGTERM.
    Serve {
        /// Override the listen address of receiver.toml.
        #[arg(long)]
        listen: Option<String>,
        /// Seconds between retention and garbage-collection passes.
        #[arg(long, default_value_t = 60)]
        gc_interval_secs: u64,
        /// Seconds between passes of the EBS uploader (with [ebs] in receiver.toml): each
        /// pass resumes an interrupted upload or starts the one that is due.
        #[arg(long, default_value_t = 10)]
        ebs_interval_secs: u64,
    },
    /// Verify every stored block; quarantine corrupt ones so that agents resend them.
    Scrub {
        #[arg(long)]
        json: bool,
    },
    /// Make a new agent token (shown once). With --server, the token works only for that
    /// server, and from then on the enrolment token no longer works for it.
    TokenAdd {
        /// Scope the token to this server id.
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make a one-time enrolment code for a server's agent (shown once, expires). With it,
    /// `lifeboat-agent enroll` gets a client certificate from this receiver's CA; from then on
    /// agent and receiver authenticate each other (mutual TLS) and tokens no longer work for
    /// that server.
    #[command(
        after_help = "Moving a server from its token to a certificate: run `enroll --server S` \
        here, then `lifeboat-agent enroll --code ...` on S. A running agent picks the \
        certificate up by itself (its token connection is closed and it reconnects); nothing \
        is resent. Enrolling a server again replaces its certificate and cuts off the old one."
    )]
    Enroll {
        /// The server id the code is for (the agent's server_id).
        #[arg(long)]
        server: String,
        /// Minutes the code stays valid (at most 10080, 7 days).
        #[arg(long, default_value_t = 60)]
        valid_minutes: u64,
        #[arg(long)]
        json: bool,
    },
    /// List every server's identity (certificate, token or revoked), host, certificate
    /// expiry and last contact, and the enrolment codes not used yet.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Refuse a server's agent from now on: its certificate and tokens stop working, and the
    /// running receiver closes its connection within a second. Its replicas and points stay;
    /// `enroll` lets it back.
    Revoke {
        /// The server id, as `agents` lists it.
        #[arg(long)]
        server: String,
    },
    /// Check receiver.toml (or another file) and exit non-zero naming what is wrong.
    Validate {
        /// The file to check; default <state-dir>/receiver.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List servers and their disks: state, lag, backlog, last point.
    Servers {
        #[arg(long)]
        json: bool,
    },
    /// Let another machine take a server id now: the machine that held it is forgotten (it
    /// is refused only while connected or heard from within server_lease_minutes).
    #[command(
        after_help = "Use it when a server was rebuilt or replaced and its new machine \
        is refused with \"server id ... belongs to host ...\". If two live machines share a \
        server id (a cloned VM), give one its own server_id in agent.toml instead."
    )]
    Release {
        /// The server id, as `servers` lists it.
        #[arg(long)]
        server: String,
    },
    /// List a server's points in time.
    Points {
        /// The server id, as `servers` lists it.
        #[arg(long)]
        server: String,
        #[arg(long)]
        json: bool,
    },
    /// Restore one disk of one point to a file or block device, verifying every block.
    #[command(after_help = "Examples:\n  \
        lifeboat-receiver points --server web-01\n  \
        lifeboat-receiver restore --server web-01 --disk root --point 42 --to /srv/restore/root.img\n  \
        lifeboat-receiver restore --server web-01 --disk data --to /dev/nvme1n1 --force\n  \
        lifeboat-receiver restore --server web-01 --disk data --to /dev/sdb --force --only-changed --since 40\n\n\
        Every block is checked against the point's manifest; the destination is read back and\n\
        checked again unless --no-verify. Exit code 65: a block is missing or corrupt (named).")]
    Restore {
        /// The server id, as `servers` lists it.
        #[arg(long)]
        server: String,
        /// The disk id, as the agent's config names it (`points --json` lists each point's disks).
        #[arg(long)]
        disk: String,
        /// A point number from `points`, or "latest".
        #[arg(long, default_value = "latest")]
        point: String,
        /// Destination: a new file, or a block device at least as large as the disk.
        #[arg(long)]
        to: PathBuf,
        /// Overwrite an existing file, or restore onto a block device (opened exclusively:
        /// refused while mounted or in use).
        #[arg(long)]
        force: bool,
        /// Skip reading the destination back after writing (faster; proves less).
        #[arg(long)]
        no_verify: bool,
        /// Where to read the point from: the staging store, or its EBS snapshot (needs [ebs]
        /// in receiver.toml and the point on EBS; every block is checked against its SHA-256
        /// and against the point's manifest).
        #[arg(long, value_enum, default_value_t = crate::commands::restore::From::Staging)]
        from: crate::commands::restore::From,
        /// Failback: `--to` holds an older copy of the disk (e.g. the original server's disk
        /// after a recovery); read it and write only the blocks that differ from the point.
        #[arg(long)]
        only_changed: bool,
        /// With --only-changed: `--to` holds this point (e.g. the one it was restored from),
        /// so only the blocks changed since it are written (from the points' manifests, and
        /// with --from ebs also EBS's ListChangedBlocks between their snapshots), without
        /// reading the destination first. The read-back still proves every block, and writes
        /// any that did not hold that point's content.
        #[arg(long, requires = "only_changed", value_name = "POINT")]
        since: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put one point on EBS now (an incremental snapshot per disk), whatever the policy;
    /// tries a failed upload again.
    #[command(after_help = "Examples:\n  \
        lifeboat-receiver snapshot --server web-01 --point latest\n  \
        lifeboat-receiver snapshot --server web-01 --point 42 --json\n\n\
        Needs [ebs] in receiver.toml and AWS credentials from the standard chain (environment,\n\
        profile, instance role). `serve` does the same in the background by policy.")]
    Snapshot {
        /// The server id, as `servers` lists it.
        #[arg(long)]
        server: String,
        /// A point number from `points`, or "latest".
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        json: bool,
    },
    /// Launch a point as an EC2 instance: put it on EBS if needed, register an image from its
    /// snapshots, run an instance, wait until it runs.
    #[command(after_help = "Examples:\n  \
        lifeboat-receiver recover --server web-01 --drill          # a drill from the latest point\n  \
        lifeboat-receiver recover --server web-01 --point 42       # a real recovery\n  \
        lifeboat-receiver recover --server web-01 --dry-run        # what would be launched\n  \
        lifeboat-receiver drills --terminate                       # clean up drills\n\n\
        Launch settings come from [recovery.<server>] over [recovery.default] in receiver.toml:\n\
        instance_type, subnet_id, security_group_ids, key_name, launch_template_id,\n\
        architecture, boot_mode, boot_disk, volume_type.")]
    Recover {
        /// The server id, as `servers` lists it.
        #[arg(long)]
        server: String,
        /// A point number from `points`, or "latest".
        #[arg(long, default_value = "latest")]
        point: String,
        /// A drill: everything tagged lifeboat:drill=true, for `drills` to list and clean up.
        #[arg(long)]
        drill: bool,
        /// Ask EC2 (DryRun) whether the launch would be allowed, and print what would be
        /// launched; nothing is uploaded or created.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// List drill instances and images; --terminate terminates and deregisters them.
    Drills {
        #[arg(long)]
        terminate: bool,
        #[arg(long)]
        json: bool,
    },
    /// Bring back what was deleted from the bucket of [s3] since a time: removes the delete
    /// markers a plain DELETE leaves in a versioned bucket (as Object Lock needs), so the
    /// points and blocks they hid are current again. For recovering from an intruder holding
    /// the credentials, or a mistake. Run it with an admin's credentials (it needs
    /// s3:ListBucketVersions and s3:DeleteObjectVersion), then restart the receivers.
    Undelete {
        /// The time the deleting began, e.g. 2026-12-03T18:00:00Z (RFC 3339, UTC): markers
        /// placed since then are removed.
        #[arg(long)]
        since: String,
        /// List what would come back; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// (Packaging) Write the man pages and shell completions into DIR.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

/// Runs a parsed command; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    lifeboat_common::logging::init(cli.log.as_deref().unwrap_or("info"));
    // Root on the service's state directory acts as the service's user (see sys.rs); restore
    // keeps root for the block devices it writes (it only reads the state, but its lock). A
    // state directory that does not exist yet, or is root's, changes nothing.
    if !matches!(
        cli.command,
        Command::GenerateDocs { .. } | Command::Restore { .. }
    ) {
        match crate::sys::become_owner_of(&cli.state_dir) {
            Ok(Some(uid)) => tracing::debug!(uid, "acting as the owner of the state directory"),
            Ok(None) => {}
            Err(e) => {
                eprintln!(
                    "error: {} belongs to another user, and becoming that user failed: {e}",
                    cli.state_dir.display()
                );
                return 1;
            }
        }
    }
    let r = match cli.command {
        Command::Init {
            listen,
            names,
            json,
        } => crate::commands::init::run(&cli.state_dir, &listen, &names, json),
        Command::Serve {
            listen,
            gc_interval_secs,
            ebs_interval_secs,
        } => crate::commands::serve::run(
            &cli.state_dir,
            listen,
            gc_interval_secs,
            ebs_interval_secs,
            cli.log.clone(),
        ),
        Command::Snapshot {
            server,
            point,
            json,
        } => crate::commands::snapshot::run(&cli.state_dir, &server, &point, json),
        Command::Recover {
            server,
            point,
            drill,
            dry_run,
            json,
        } => crate::commands::recover::run(
            &cli.state_dir,
            &crate::commands::recover::Request {
                server,
                point,
                drill,
                dry_run,
                json,
            },
        ),
        Command::Drills { terminate, json } => {
            crate::commands::drills::run(&cli.state_dir, terminate, json)
        }
        Command::Scrub { json } => crate::commands::scrub::run(&cli.state_dir, json),
        Command::Undelete {
            since,
            dry_run,
            json,
        } => crate::commands::undelete::run(&cli.state_dir, &since, dry_run, json),
        Command::TokenAdd { server, json } => {
            crate::commands::token::add(&cli.state_dir, server.as_deref(), json)
        }
        Command::Enroll {
            server,
            valid_minutes,
            json,
        } => crate::commands::enroll::run(&cli.state_dir, &server, valid_minutes, json),
        Command::Agents { json } => crate::commands::agents::run(&cli.state_dir, json),
        Command::Revoke { server } => crate::commands::revoke::run(&cli.state_dir, &server),
        Command::Validate { config } => crate::commands::validate::run(&cli.state_dir, config),
        Command::Servers { json } => crate::commands::servers::run(&cli.state_dir, json),
        Command::Release { server } => crate::commands::release::run(&cli.state_dir, &server),
        Command::Points { server, json } => {
            crate::commands::points::run(&cli.state_dir, &server, json)
        }
        Command::Restore {
            server,
            disk,
            point,
            to,
            force,
            no_verify,
            from,
            only_changed,
            since,
            json,
        } => crate::commands::restore::run(
            &cli.state_dir,
            &crate::commands::restore::Request {
                server,
                disk,
                point,
                to,
                force,
                verify: !no_verify,
                from,
                only_changed,
                since,
                json,
            },
        ),
        Command::GenerateDocs { dir } => {
            lifeboat_common::docgen::write_all(<Cli as clap::CommandFactory>::command(), &dir)
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("writing the docs into {}: {e}", dir.display()))
        }
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<lifeboat_common::config::ConfigError>()
                .is_some()
            {
                exit::CONFIG
            } else if e
                .downcast_ref::<crate::commands::restore::DataError>()
                .is_some()
            {
                exit::DATA
            } else {
                exit::FAILURE
            }
        }
    }
}
