//! AWS clients and the one function that decides what is retryable.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::error::SdkError;

use crate::config::Config;

/// Shared SDK configuration: region and credentials from the standard chain.
/// Retries are ours (see [`classify`]), so the SDK's are off.
pub async fn sdk_config(config: &Config) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .build(),
        );
    if !config.aws.region.is_empty() {
        loader = loader.region(Region::new(config.aws.region.clone()));
    }
    loader.load().await
}

pub fn s3_client(sdk: &SdkConfig, config: &Config) -> aws_sdk_s3::Client {
    let mut b =
        aws_sdk_s3::config::Builder::from(sdk).force_path_style(config.aws.s3.force_path_style);
    if !config.aws.s3.endpoint_url.is_empty() {
        b = b.endpoint_url(&config.aws.s3.endpoint_url);
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

pub fn sagemaker_client(sdk: &SdkConfig, config: &Config) -> aws_sdk_sagemakerruntime::Client {
    let mut b = aws_sdk_sagemakerruntime::config::Builder::from(sdk);
    if !config.aws.sagemaker.endpoint_url.is_empty() {
        b = b.endpoint_url(&config.aws.sagemaker.endpoint_url);
    }
    aws_sdk_sagemakerruntime::Client::from_conf(b.build())
}

pub fn sns_client(sdk: &SdkConfig, config: &Config) -> aws_sdk_sns::Client {
    let mut b = aws_sdk_sns::config::Builder::from(sdk);
    if !config.aws.sns.endpoint_url.is_empty() {
        b = b.endpoint_url(&config.aws.sns.endpoint_url);
    }
    aws_sdk_sns::Client::from_conf(b.build())
}

/// What to do about a failed AWS call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Throttled: retry after a backoff.
    Throttled,
    /// The service is down or failed internally: retry after a backoff.
    Unavailable,
    /// The call timed out: retry.
    Timeout,
    /// The request never got an answer (connection refused, reset, DNS): retry.
    Network,
    /// The request itself was refused (4xx): retrying cannot help.
    Rejected,
    /// Every request would be refused: credentials denied, expired or
    /// unknown, or the target does not exist. Not the input's fault.
    Systemic,
}

impl ErrorClass {
    /// Whether the same call may succeed if tried again soon.
    pub fn retryable(self) -> bool {
        !matches!(self, ErrorClass::Rejected | ErrorClass::Systemic)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Throttled => "throttled",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Network => "network",
            ErrorClass::Rejected => "rejected",
            ErrorClass::Systemic => "systemic",
        }
    }
}

/// Codes AWS services answer when the caller, not the request, is refused.
const SYSTEMIC_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "ExpiredTokenException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSignatureException",
    "MissingAuthenticationToken",
    "IncompleteSignature",
    "RequestExpired",
    "RequestTimeTooSkewed",
    "NotAuthorized",
    "AuthFailure",
];

const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "ModelNotReadyException",
];

const UNAVAILABLE_CODES: &[&str] = &[
    "ServiceUnavailable",
    "InternalFailure",
    "InternalDependencyException",
    "InternalError",
    "InternalServerError",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Classifies by error code first (AWS puts throttling on HTTP 400), then by status.
pub fn classify_code(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    if let Some(code) = code {
        if SYSTEMIC_CODES.contains(&code) {
            return ErrorClass::Systemic;
        }
        if THROTTLING_CODES.contains(&code) {
            return ErrorClass::Throttled;
        }
        if UNAVAILABLE_CODES.contains(&code) {
            return ErrorClass::Unavailable;
        }
    }
    match status {
        Some(429) => ErrorClass::Throttled,
        Some(408) => ErrorClass::Timeout,
        Some(s) if s >= 500 => ErrorClass::Unavailable,
        Some(_) => ErrorClass::Rejected,
        None => ErrorClass::Network,
    }
}

/// Classifies any SDK error.
pub fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> ErrorClass {
    match err {
        SdkError::TimeoutError(_) => ErrorClass::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => ErrorClass::Timeout,
        SdkError::DispatchFailure(_) => ErrorClass::Network,
        // No request could be made (no credentials, a bad region or
        // endpoint URL): true of every request.
        SdkError::ConstructionFailure(_) => ErrorClass::Systemic,
        SdkError::ResponseError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            match status {
                Some(s) if s < 500 && s != 429 => ErrorClass::Rejected,
                Some(_) => ErrorClass::Unavailable,
                None => ErrorClass::Network,
            }
        }
        _ => classify_code(err.code(), err.raw_response().map(|r| r.status().as_u16())),
    }
}

/// A one-line description of an SDK error: code, status and message, no secrets.
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: &SdkError<E, HttpResponse>,
) -> String {
    let status = err
        .raw_response()
        .map(|r| format!(" (HTTP {})", r.status().as_u16()))
        .unwrap_or_default();
    match (err.code(), err.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}{status}"),
        (Some(code), None) => format!("{code}{status}"),
        _ => {
            // No modelled code (e.g. an error body the SDK cannot parse):
            // the error chain, and the status, which is then what tells.
            let mut s = err.to_string();
            let mut src = std::error::Error::source(err);
            while let Some(e) = src {
                s.push_str(": ");
                s.push_str(&e.to_string());
                src = e.source();
            }
            s.push_str(&status);
            s
        }
    }
}

/// Exponential backoff with full jitter: a random wait in
/// `0..=min(max, initial * 2^attempt)`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let ceiling = initial
        .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_is_recognised_by_code_even_on_400() {
        assert_eq!(
            classify_code(Some("ThrottlingException"), Some(400)),
            ErrorClass::Throttled
        );
        assert_eq!(
            classify_code(Some("SlowDown"), Some(503)),
            ErrorClass::Throttled
        );
        assert_eq!(
            classify_code(Some("ModelNotReadyException"), Some(429)),
            ErrorClass::Throttled
        );
        assert_eq!(
            classify_code(Some("ServiceUnavailable"), Some(503)),
            ErrorClass::Unavailable
        );
        assert_eq!(
            classify_code(Some("InternalDependencyException"), Some(530)),
            ErrorClass::Unavailable
        );
        assert_eq!(
            classify_code(Some("ModelError"), Some(424)),
            ErrorClass::Rejected
        );
        assert_eq!(
            classify_code(Some("ValidationError"), Some(400)),
            ErrorClass::Rejected
        );
        assert_eq!(classify_code(None, Some(502)), ErrorClass::Unavailable);
        for code in [
            "AccessDeniedException",
            "ExpiredTokenException",
            "UnrecognizedClientException",
            "RequestTimeTooSkewed",
        ] {
            assert_eq!(
                classify_code(Some(code), Some(400)),
                ErrorClass::Systemic,
                "{code}"
            );
            assert!(!ErrorClass::Systemic.retryable());
        }
        assert_eq!(classify_code(None, None), ErrorClass::Network);
    }

    #[test]
    fn backoff_stays_within_its_ceiling() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(2);
        for attempt in 0..40 {
            let b = backoff(attempt, i, m);
            assert!(b <= m);
            assert!(b <= i * 2u32.saturating_pow(attempt.min(20)));
        }
    }
}
