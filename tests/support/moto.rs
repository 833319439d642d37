//! moto in server mode (the pip package, installed by `tests/prereqs.sh` into its own
//! virtualenv), for EC2's images and instances and as an S3 server: started on a free
//! loopback port, killed on drop. Its S3 takes unsigned path-style requests, which the tests
//! use to set buckets up and to look inside them.

use super::{free_port, wait_for, Proc};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub struct Moto {
    pub addr: SocketAddr,
    _proc: Proc,
}

impl Moto {
    /// Starts moto; `None` (said loudly) where it is not installed, except under CI, where
    /// that is a failure.
    pub fn start(root: &Path) -> Option<Moto> {
        let exe = std::env::var("LIFEBOAT_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        if Command::new(&exe).arg("--help").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "moto_server ({exe}) is needed under CI: tests/run.sh installs it"
            );
            eprintln!("SKIPPED (loudly): {exe} not found; run tests/run.sh to install moto");
            return None;
        }
        let port = free_port();
        let mut proc = Proc::new(root.join("moto.log"));
        let mut cmd = Command::new(&exe);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        proc.start(cmd);
        wait_for("moto to listen", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Moto {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _proc: proc,
        })
    }
}

/// moto refuses anonymous reads of private objects; any signature passes.
const AUTH: (&str, &str) = (
    "authorization",
    "AWS4-HMAC-SHA256 Credential=lifeboat-test/20260101/us-east-1/s3/aws4_request, \
     SignedHeaders=host, Signature=0",
);

impl Moto {
    /// An S3 request to moto, as an authenticated client.
    fn s3(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        crate::http_request(&self.addr.to_string(), method, path, &[AUTH], body)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a bucket (path-style, unsigned).
    pub fn create_bucket(&self, bucket: &str) {
        let (code, body) = self.s3("PUT", &format!("/{bucket}"), &[]);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// The object at `key`, if any.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let (code, body) = self.s3("GET", &format!("/{bucket}/{key}"), &[]);
        (code == 200).then_some(body)
    }

    /// Writes `body` at `key` behind the receivers' backs.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let (code, _) = self.s3("PUT", &format!("/{bucket}/{key}"), body);
        assert_eq!(code, 200);
    }

    /// Deletes the object at `key` behind the receivers' backs.
    pub fn delete(&self, bucket: &str, key: &str) {
        let (code, _) = self.s3("DELETE", &format!("/{bucket}/{key}"), &[]);
        assert_eq!(code, 204);
    }

    /// Every key under `prefix`, in order (ListObjectsV2, every page).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token = String::new();
        loop {
            let mut path = format!("/{bucket}?list-type=2&prefix={prefix}");
            if !token.is_empty() {
                path.push_str("&continuation-token=");
                path.push_str(
                    &form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>(),
                );
            }
            let (code, body) = self.s3("GET", &path, &[]);
            let body = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(code, 200, "{body}");
            let tag = |t: &str| -> Vec<String> {
                body.split(&format!("<{t}>"))
                    .skip(1)
                    .filter_map(|s| s.split(&format!("</{t}>")).next())
                    .map(str::to_string)
                    .collect()
            };
            keys.extend(tag("Key"));
            match tag("NextContinuationToken").first() {
                Some(t) if body.contains("<IsTruncated>true</IsTruncated>") => token = t.clone(),
                _ => break,
            }
        }
        keys
    }
}

/// An S3 client of its own (its own connections) of the server at `url`, path-style, with
/// test credentials: to look at the bucket as an admin (or an attacker) would.
pub fn sdk_client(url: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("lifeboat-test", "x", None, None, "test"))
        .http_client(lifeboat_receiver::aws::http_client())
        .endpoint_url(url)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}
