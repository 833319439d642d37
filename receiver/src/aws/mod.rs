//! What every AWS client of the receiver shares: one HTTPS client on rustls + ring (the SDK's
//! default would build aws-lc, a C library), explicit timeouts, the standard credential chain,
//! and the retry policy of [`retry`] (the SDK's own retries are off).

pub mod retry;
pub mod s3;

use std::time::Duration;

/// HTTPS on rustls with ring.
pub fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// The shared SDK configuration for `region`: the AWS credential chain (environment,
/// profile, instance role, web identity), the timeouts, no SDK retries.
pub async fn sdk_config(
    region: &str,
    connect_timeout_secs: u64,
    attempt_timeout_secs: u64,
) -> aws_config::SdkConfig {
    let attempt = Duration::from_secs(attempt_timeout_secs);
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(connect_timeout_secs))
        .read_timeout(attempt)
        .operation_attempt_timeout(attempt)
        .operation_timeout(attempt)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .http_client(http_client())
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await
}
