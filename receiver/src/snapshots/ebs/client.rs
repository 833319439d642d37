//! The AWS clients of the EBS target (EBS direct APIs, EC2), with explicit timeouts; every
//! call goes through the one retry policy of [`crate::aws::retry`].

use crate::aws::retry::{CallError, HasStatus, Retrier};
use aws_sdk_ebs::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use lifeboat_common::config::EbsConfig;
use std::future::Future;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum EbsError {
    /// AWS refused it and trying again cannot help (access, KMS key, quota, parameters).
    #[error("{op} ({what}): {message}")]
    Permanent {
        op: &'static str,
        what: String,
        message: String,
    },
    /// It kept failing in a way that may pass; the next pass tries again.
    #[error("{op} ({what}): still failing after {attempts} attempts: {message}")]
    Exhausted {
        op: &'static str,
        what: String,
        attempts: u32,
        message: String,
    },
    /// Something on this side: a block the store cannot give, a manifest, a snapshot that
    /// went to `error`.
    #[error("{0}")]
    Local(String),
}

impl EbsError {
    /// Whether the point should go `failed` (reported; retried only on demand) rather than
    /// stay queued for the next pass.
    pub fn is_permanent(&self) -> bool {
        matches!(self, EbsError::Permanent { .. })
    }
}

/// Both clients, built once per receiver from `[ebs]`.
#[derive(Clone)]
pub struct Aws {
    pub ebs: aws_sdk_ebs::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub config: EbsConfig,
    /// Retries, throttles and the pace, shared by both clients.
    pub retrier: Retrier,
}

impl Aws {
    pub async fn connect(config: &EbsConfig) -> Aws {
        let shared = crate::aws::sdk_config(
            &config.region,
            config.connect_timeout_secs,
            config.attempt_timeout_secs,
        )
        .await;
        let mut ebs = aws_sdk_ebs::config::Builder::from(&shared);
        if let Some(u) = &config.endpoint_url {
            ebs = ebs.endpoint_url(u);
        }
        let mut ec2 = aws_sdk_ec2::config::Builder::from(&shared);
        if let Some(u) = config
            .ec2_endpoint_url
            .as_ref()
            .or(config.endpoint_url.as_ref())
        {
            ec2 = ec2.endpoint_url(u);
        }
        Aws {
            ebs: aws_sdk_ebs::Client::from_conf(ebs.build()),
            ec2: aws_sdk_ec2::Client::from_conf(ec2.build()),
            config: config.clone(),
            retrier: Retrier::new(config.max_attempts),
        }
    }

    /// Runs `call` under the retry policy (see [`crate::aws::retry`]).
    pub async fn retry<T, E, R, F, Fut>(
        &self,
        op: &'static str,
        what: &str,
        fresh_until: Option<Instant>,
        call: F,
    ) -> Result<T, EbsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: HasStatus + std::fmt::Debug,
    {
        self.retrier
            .run(op, what, fresh_until, call)
            .await
            .map_err(EbsError::from)
    }
}

impl From<CallError> for EbsError {
    fn from(e: CallError) -> EbsError {
        match e {
            CallError::Permanent {
                op, what, message, ..
            } => EbsError::Permanent { op, what, message },
            CallError::Exhausted {
                op,
                what,
                attempts,
                message,
            } => EbsError::Exhausted {
                op,
                what,
                attempts,
                message,
            },
        }
    }
}
