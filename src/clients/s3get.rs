//! A lean S3 GetObject for the fetch stage's hot path.
//!
//! At the service's ceiling the SDK's GetObject spent about 45% of the
//! service's CPU in per-request orchestration: runtime plugins,
//! interceptors, endpoint rules, identity resolution and the signer's
//! wrapper, around one small HTTP GET. This path keeps what matters from
//! the AWS crates and drops the rest:
//!
//! - the S3 endpoint rules (`aws-sdk-s3`'s resolver), once per bucket;
//! - the standard credential chain from the `SdkConfig`, cached until
//!   shortly before the credentials expire;
//! - SigV4 from `aws-sigv4`, with S3's settings;
//! - the SDK's own HTTPS connector (rustls, connection pool, proxy from the
//!   environment, the 5 s connect timeout).
//!
//! Buckets whose endpoint asks for anything else (S3 Express directory
//! buckets, Multi-Region Access Points, endpoint headers) and ARNs go to
//! the SDK: [`Target::Sdk`]. `aws.s3.lean_get_object = false` sends every
//! GetObject to the SDK.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::http::{
    HttpConnector, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::Document;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::clients::aws::{classify_code, ErrorClass};

/// What a key keeps unencoded in the path: RFC 3986's unreserved
/// characters and `/` (the SDK's greedy label).
const KEY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// What a query value keeps unencoded.
const QUERY: &AsciiSet = &KEY.add(b'/');

/// SHA-256 of the empty body, the payload hash of every GET.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Credentials are fetched again this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// How long credentials without an expiry are kept (the SDK's identity
/// cache keeps them 15 minutes).
const NO_EXPIRY_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// After a failed refresh with credentials still valid, the next try.
const RETRY_REFRESH: Duration = Duration::from_secs(10);

/// The longest wait for the credential chain (the SDK's load timeout).
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// Buckets whose endpoint is remembered; the map is cleared when full.
const MAX_BUCKETS: usize = 1024;

/// The most of an error answer that is read for its code and message.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Where the GetObjects for one bucket go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A plain SigV4 endpoint.
    Lean(Arc<Endpoint>),
    /// Through the SDK, for the reason given.
    Sdk(Arc<str>),
    /// No request can be made for this bucket.
    Invalid(Arc<str>),
}

/// A bucket's resolved endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL the encoded key is appended to, without a trailing `/`.
    base: String,
    /// Its authority, the `host` header.
    host: String,
    signing_region: String,
    signing_name: String,
}

/// What GetObject answered with a 2xx.
#[derive(Debug)]
pub struct Object {
    pub content_length: Option<u64>,
    /// Without its quotes.
    pub etag: Option<String>,
    pub body: ByteStream,
}

/// Why GetObject failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetError {
    /// HTTP 404: no such key, version or bucket.
    NotFound,
    /// Anything else, classified as the SDK's errors are.
    Failed(ErrorClass, String),
}

/// Credentials as signed with, and when to load them again.
struct Cached {
    identity: Identity,
    refresh_at: SystemTime,
    expiry: Option<SystemTime>,
}

/// The lean GetObject client; one is shared by all fetches.
pub struct LeanS3 {
    connector: SharedHttpConnector,
    credentials: Option<SharedCredentialsProvider>,
    identity: Mutex<Option<Cached>>,
    /// One credential load at a time.
    loading: tokio::sync::Mutex<()>,
    region: Option<String>,
    use_fips: bool,
    use_dual_stack: bool,
    endpoint_url: Option<String>,
    force_path_style: bool,
    resolver: DefaultResolver,
    targets: Mutex<HashMap<String, Target>>,
}

impl std::fmt::Debug for LeanS3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanS3")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("force_path_style", &self.force_path_style)
            .finish_non_exhaustive()
    }
}

impl LeanS3 {
    /// The client for `sdk`'s region, credentials and endpoint settings;
    /// `endpoint_url` (empty for AWS) and `force_path_style` as for the
    /// SDK's S3 client.
    pub fn new(sdk: &SdkConfig, endpoint_url: &str, force_path_style: bool) -> LeanS3 {
        let settings = HttpConnectorSettings::builder()
            .connect_timeout(Duration::from_secs(5))
            .build();
        let connector = aws_smithy_http_client::Connector::builder()
            .connector_settings(settings)
            .sleep_impl(aws_smithy_async::rt::sleep::TokioSleep::new())
            .proxy_config(aws_smithy_http_client::proxy::ProxyConfig::from_env())
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build();
        // As the SDK's S3 client: the configured URL, else AWS_ENDPOINT_URL_S3
        // or the profile's, else AWS_ENDPOINT_URL.
        let endpoint_url = if endpoint_url.is_empty() {
            sdk.service_config()
                .and_then(|c| {
                    aws_types::service_config::ServiceConfigKey::builder()
                        .service_id("S3")
                        .env("AWS_ENDPOINT_URL")
                        .profile("endpoint_url")
                        .build()
                        .ok()
                        .and_then(|key| c.load_config(key))
                })
                .or_else(|| sdk.endpoint_url().map(str::to_string))
        } else {
            Some(endpoint_url.to_string())
        };
        LeanS3 {
            connector: SharedHttpConnector::new(connector),
            credentials: sdk.credentials_provider(),
            identity: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            region: sdk.region().map(|r| r.to_string()),
            use_fips: sdk.use_fips().unwrap_or(false),
            use_dual_stack: sdk.use_dual_stack().unwrap_or(false),
            endpoint_url,
            force_path_style,
            resolver: DefaultResolver::new(),
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// Where `bucket`'s GetObjects go; resolved once and remembered.
    pub async fn target(&self, bucket: &str) -> Target {
        if let Some(t) = lock(&self.targets).get(bucket) {
            return t.clone();
        }
        let target = self.resolve(bucket).await;
        match &target {
            Target::Sdk(why) => {
                tracing::info!(%bucket, reason = %why, "GetObject for this bucket goes through the SDK")
            }
            Target::Invalid(why) => {
                tracing::warn!(%bucket, error = %why, "no GetObject for this bucket")
            }
            Target::Lean(_) => {}
        }
        let mut targets = lock(&self.targets);
        if targets.len() >= MAX_BUCKETS {
            targets.clear();
        }
        targets.insert(bucket.to_string(), target.clone());
        target
    }

    async fn resolve(&self, bucket: &str) -> Target {
        if bucket.starts_with("arn:") {
            return Target::Sdk("the bucket is an ARN".into());
        }
        let params = match Params::builder()
            .bucket(bucket)
            .set_region(self.region.clone())
            .use_fips(self.use_fips)
            .use_dual_stack(self.use_dual_stack)
            .set_endpoint(self.endpoint_url.clone())
            .force_path_style(self.force_path_style)
            .build()
        {
            Ok(p) => p,
            Err(e) => return Target::Invalid(format!("S3 endpoint parameters: {e}").into()),
        };
        let endpoint = match self.resolver.resolve_endpoint(&params).await {
            Ok(e) => e,
            Err(e) => {
                return Target::Invalid(format!("no S3 endpoint for bucket {bucket:?}: {e}").into())
            }
        };
        if endpoint.headers().next().is_some() {
            return Target::Sdk("its endpoint asks for extra headers".into());
        }
        // Plain S3 endpoints have no properties; S3 Express says
        // `backend`. Whatever it is, the SDK knows what to do with it.
        if !endpoint.properties().is_empty() {
            let mut keys: Vec<&str> = endpoint.properties().keys().map(|k| k.as_ref()).collect();
            keys.sort_unstable();
            return Target::Sdk(format!("its endpoint has properties {keys:?}").into());
        }
        // Signed as the endpoint says (a region of its own for
        // `aws-global`, `s3-outposts` for Outposts access points); any
        // scheme but SigV4 is the SDK's.
        let region = self.region.clone().unwrap_or_default();
        let (signing_region, signing_name) = match endpoint.auth_schemes().first() {
            None => (region, "s3".to_string()),
            Some(scheme) if scheme.name() == "sigv4" => {
                let text = |key: &str| match scheme.get(key) {
                    Some(Document::String(s)) => Some(s.clone()),
                    _ => None,
                };
                (
                    text("signingRegion").unwrap_or(region),
                    text("signingName").unwrap_or_else(|| "s3".to_string()),
                )
            }
            Some(scheme) => {
                return Target::Sdk(
                    format!("its endpoint asks for auth scheme {:?}", scheme.name()).into(),
                )
            }
        };
        let base = endpoint.url().trim_end_matches('/').to_string();
        let host = match base.parse::<http::Uri>() {
            Ok(uri) => match uri.authority() {
                Some(a) => a.to_string(),
                None => return Target::Invalid(format!("S3 endpoint {base} has no host").into()),
            },
            Err(e) => return Target::Invalid(format!("S3 endpoint {base}: {e}").into()),
        };
        Target::Lean(Arc::new(Endpoint {
            base,
            host,
            signing_region,
            signing_name,
        }))
    }

    /// One signed GET of `key` (and `version`) at `endpoint`.
    pub async fn get(
        &self,
        endpoint: &Endpoint,
        key: &str,
        version: Option<&str>,
    ) -> Result<Object, GetError> {
        let request = self.signed(endpoint, key, version).await?;
        let response = match self.connector.call(request).await {
            Ok(r) => r,
            Err(e) => {
                let class = if e.is_timeout() {
                    ErrorClass::Timeout
                } else {
                    ErrorClass::Network
                };
                return Err(GetError::Failed(
                    class,
                    format!("GetObject got no answer: {}", DisplayErrorContext(&e)),
                ));
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.trim_matches('"').to_string())
        };
        if (200..300).contains(&status) {
            return Ok(Object {
                content_length: header("content-length").and_then(|v| v.parse().ok()),
                etag: header("etag"),
                body: ByteStream::new(response.into_body()),
            });
        }
        if status == 404 {
            return Err(GetError::NotFound);
        }
        let body = read_error_body(response.into_body()).await;
        let code = element(&body, "Code");
        let message = element(&body, "Message");
        let class = classify_code(code, Some(status));
        let detail = match (code, message) {
            (Some(c), Some(m)) => format!("{c}: {m} (HTTP {status})"),
            (Some(c), None) => format!("{c} (HTTP {status})"),
            _ => format!("GetObject answered HTTP {status} without an error code"),
        };
        Err(GetError::Failed(class, detail))
    }

    /// The request, signed with the cached credentials.
    async fn signed(
        &self,
        endpoint: &Endpoint,
        key: &str,
        version: Option<&str>,
    ) -> Result<aws_smithy_runtime_api::http::Request, GetError> {
        if key.is_empty() {
            return Err(GetError::Failed(
                ErrorClass::Rejected,
                "the object key is empty".into(),
            ));
        }
        let mut uri = String::with_capacity(endpoint.base.len() + key.len() + 64);
        uri.push_str(&endpoint.base);
        uri.push('/');
        uri.extend(utf8_percent_encode(key, KEY));
        if let Some(v) = version {
            uri.push_str("?versionId=");
            uri.extend(utf8_percent_encode(v, QUERY));
        }
        let identity = self.identity().await?;
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let unsignable = |e: &dyn std::fmt::Display| {
            GetError::Failed(
                ErrorClass::Rejected,
                format!("GetObject for key {key:?} cannot be signed: {e}"),
            )
        };
        let params: aws_sigv4::http_request::SigningParams = v4::SigningParams::builder()
            .identity(&identity)
            .region(&endpoint.signing_region)
            .name(&endpoint.signing_name)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| unsignable(&e))?
            .into();
        let signable = SignableRequest::new(
            "GET",
            uri.as_str(),
            std::iter::once(("host", endpoint.host.as_str())),
            SignableBody::Precomputed(EMPTY_SHA256.to_string()),
        )
        .map_err(|e| unsignable(&e))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| unsignable(&e))?
            .into_parts();
        let mut request = http::Request::builder()
            .method("GET")
            .uri(uri.as_str())
            .header("host", endpoint.host.as_str())
            .header(
                "user-agent",
                concat!("inferstream/", env!("CARGO_PKG_VERSION")),
            )
            .body(SdkBody::empty())
            .map_err(|e| unsignable(&e))?;
        instructions.apply_to_request_http1x(&mut request);
        aws_smithy_runtime_api::http::Request::try_from(request).map_err(|e| unsignable(&e))
    }

    /// The cached identity, if it is not due for a refresh at `now`.
    fn fresh(&self, now: SystemTime) -> Option<Identity> {
        lock(&self.identity)
            .as_ref()
            .filter(|c| now < c.refresh_at)
            .map(|c| c.identity.clone())
    }

    /// The cached identity, loaded from the credential chain when missing
    /// or about to expire. Wall-clock times, as the credentials' expiry
    /// is (a host suspended for a while must not trust a monotonic clock).
    ///
    /// One caller loads at a time. While it does, and if loading fails,
    /// the others keep signing with the cached identity until it actually
    /// expires: a credential source that fails for a moment costs nothing.
    async fn identity(&self) -> Result<Identity, GetError> {
        let now = SystemTime::now();
        if let Some(identity) = self.fresh(now) {
            return Ok(identity);
        }
        let usable = lock(&self.identity)
            .as_ref()
            .filter(|c| c.expiry.is_none_or(|e| now < e))
            .map(|c| c.identity.clone());
        let _one = match (self.loading.try_lock(), &usable) {
            (Ok(guard), _) => guard,
            (Err(_), Some(identity)) => return Ok(identity.clone()),
            (Err(_), None) => self.loading.lock().await,
        };
        if let Some(identity) = self.fresh(SystemTime::now()) {
            return Ok(identity);
        }
        let Some(provider) = &self.credentials else {
            return Err(GetError::Failed(
                ErrorClass::Systemic,
                "no AWS credentials provider is configured".into(),
            ));
        };
        let failed =
            match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
                Ok(Ok(credentials)) => {
                    let now = SystemTime::now();
                    let refresh_at = match credentials.expiry() {
                        Some(expiry) => {
                            let left = expiry.duration_since(now).unwrap_or(Duration::ZERO);
                            now + left.saturating_sub(REFRESH_BEFORE.min(left / 2))
                        }
                        None => now + NO_EXPIRY_LIFETIME,
                    };
                    let expiry = credentials.expiry();
                    let identity = Identity::from(credentials);
                    *lock(&self.identity) = Some(Cached {
                        identity: identity.clone(),
                        refresh_at,
                        expiry,
                    });
                    return Ok(identity);
                }
                // As the SDK's dispatch failure: retried with back-off.
                Ok(Err(e)) => GetError::Failed(
                    ErrorClass::Unavailable,
                    format!(
                        "AWS credentials could not be loaded: {}",
                        DisplayErrorContext(&e)
                    ),
                ),
                Err(_) => GetError::Failed(
                    ErrorClass::Timeout,
                    "the AWS credential chain did not answer within 5 s".into(),
                ),
            };
        match usable {
            Some(identity) => {
                if let GetError::Failed(_, detail) = &failed {
                    tracing::warn!(error = %detail, "refreshing AWS credentials failed; signing with the current ones until they expire");
                }
                if let Some(c) = lock(&self.identity).as_mut() {
                    c.refresh_at = SystemTime::now() + RETRY_REFRESH;
                }
                Ok(identity)
            }
            None => Err(failed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Up to [`MAX_ERROR_BODY`] bytes of an error answer, as text.
async fn read_error_body(body: SdkBody) -> String {
    let mut stream = ByteStream::new(body);
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = stream.try_next().await {
        buf.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - buf.len())]);
        if buf.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The text of the first `<name>` element of an S3 error document.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find("</")?;
    let text = xml[start..start + len].trim();
    (!text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_as_the_sdk_encodes_them() {
        let enc = |k: &str| utf8_percent_encode(k, KEY).to_string();
        assert_eq!(enc("a/b c+d=e&f"), "a/b%20c%2Bd%3De%26f");
        assert_eq!(enc("photos/2026/é.jpg"), "photos/2026/%C3%A9.jpg");
        assert_eq!(enc("x~y_z-1.png"), "x~y_z-1.png");
        assert_eq!(utf8_percent_encode("a/b+c", QUERY).to_string(), "a%2Fb%2Bc");
    }

    #[test]
    fn error_documents_give_their_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>\
                   <Message>Please reduce your request rate.</Message></Error>";
        assert_eq!(element(xml, "Code"), Some("SlowDown"));
        assert_eq!(
            element(xml, "Message"),
            Some("Please reduce your request rate.")
        );
        assert_eq!(element(xml, "RequestId"), None);
        assert_eq!(element("<Error><Code></Code></Error>", "Code"), None);
        assert_eq!(element("not xml", "Code"), None);
    }

    async fn target(endpoint_url: &str, path_style: bool, region: &str, bucket: &str) -> Target {
        let sdk = SdkConfig::builder()
            .region(aws_config::Region::new(region.to_string()))
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        LeanS3::new(&sdk, endpoint_url, path_style)
            .target(bucket)
            .await
    }

    #[tokio::test]
    async fn buckets_resolve_to_the_sdks_endpoints() {
        let Target::Lean(e) = target("", false, "eu-west-1", "photos").await else {
            panic!("expected a lean target")
        };
        assert_eq!(e.base, "https://photos.s3.eu-west-1.amazonaws.com");
        assert_eq!(e.host, "photos.s3.eu-west-1.amazonaws.com");
        assert_eq!(
            (e.signing_region.as_str(), e.signing_name.as_str()),
            ("eu-west-1", "s3")
        );
        // Dots in the name: path style, so the TLS certificate matches.
        let Target::Lean(e) = target("", false, "eu-west-1", "my.photos").await else {
            panic!("expected a lean target")
        };
        assert_eq!(e.base, "https://s3.eu-west-1.amazonaws.com/my.photos");
        let Target::Lean(e) = target("http://127.0.0.1:9000", true, "us-east-1", "b").await else {
            panic!("expected a lean target")
        };
        assert_eq!(e.base, "http://127.0.0.1:9000/b");
        assert_eq!(e.host, "127.0.0.1:9000");
        // The global endpoint signs for us-east-1.
        let Target::Lean(e) = target("", false, "aws-global", "photos").await else {
            panic!("expected a lean target")
        };
        assert_eq!(e.base, "https://photos.s3.amazonaws.com");
        assert_eq!(e.signing_region, "us-east-1");
        // An Outposts access point alias signs as s3-outposts, or is the
        // SDK's.
        let alias = "test-accessp-o0b1d075431d83bebde8xz5w8ijx1qzlbp3i3kuse10--op-s3";
        match target("", false, "us-west-1", alias).await {
            Target::Lean(e) => assert_eq!(e.signing_name, "s3-outposts", "{e:?}"),
            Target::Sdk(_) => {}
            Target::Invalid(why) => panic!("{why}"),
        }
        // S3 Express directory buckets sign with their own scheme.
        assert!(matches!(
            target("", false, "us-east-1", "bucket--use1-az4--x-s3").await,
            Target::Sdk(_)
        ));
        assert!(matches!(
            target(
                "",
                false,
                "us-east-1",
                "arn:aws:s3::123456789012:accesspoint/mfzwi23gnjvgw.mrap"
            )
            .await,
            Target::Sdk(_)
        ));
    }

    /// A credential source that counts its loads; its credentials expire
    /// `lifetime` after each load (never, for `None`); loads after the
    /// first `good` fail.
    #[derive(Debug)]
    struct Counting {
        loads: Arc<std::sync::atomic::AtomicUsize>,
        lifetime: Option<Duration>,
        good: usize,
    }

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n >= self.good {
                return aws_credential_types::provider::future::ProvideCredentials::ready(Err(
                    aws_credential_types::provider::error::CredentialsError::provider_error(
                        "the instance metadata service is down",
                    ),
                ));
            }
            aws_credential_types::provider::future::ProvideCredentials::ready(Ok(
                aws_credential_types::Credentials::new(
                    "AKID",
                    "secret",
                    None,
                    self.lifetime.map(|l| SystemTime::now() + l),
                    "counting",
                ),
            ))
        }
    }

    /// A client whose credentials live `lifetime` and fail to load after
    /// `good` loads, and its count of loads.
    fn counting(
        lifetime: Option<Duration>,
        good: usize,
    ) -> (LeanS3, Arc<std::sync::atomic::AtomicUsize>) {
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = Counting {
            loads: counter.clone(),
            lifetime,
            good,
        };
        let sdk = SdkConfig::builder()
            .credentials_provider(SharedCredentialsProvider::new(counting))
            .build();
        (LeanS3::new(&sdk, "http://127.0.0.1:1", true), counter)
    }

    /// Loads after `calls` identity lookups with credentials that live
    /// `lifetime`.
    async fn loads(lifetime: Option<Duration>, calls: usize) -> usize {
        let (lean, counter) = counting(lifetime, usize::MAX);
        for _ in 0..calls {
            assert!(lean.identity().await.is_ok());
        }
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_signing_with_credentials_not_yet_expired() {
        use std::sync::atomic::Ordering::SeqCst;
        let (lean, loads) = counting(Some(Duration::from_secs(3600)), 1);
        assert!(lean.identity().await.is_ok());
        // Due for a refresh (as five minutes before the expiry), and the
        // source is down: the credentials in hand are still good.
        let due = |lean: &LeanS3| {
            if let Some(c) = lock(&lean.identity).as_mut() {
                c.refresh_at = SystemTime::now() - Duration::from_secs(1);
            }
        };
        due(&lean);
        assert!(lean.identity().await.is_ok());
        assert_eq!(loads.load(SeqCst), 2);
        // Not asked again at every request, but after a pause.
        assert!(lean.identity().await.is_ok());
        assert_eq!(loads.load(SeqCst), 2);
        // Expired, and the source still down: an error that is retried
        // (not one that dead-letters the image at once).
        due(&lean);
        if let Some(c) = lock(&lean.identity).as_mut() {
            c.expiry = Some(SystemTime::now() - Duration::from_secs(1));
        }
        match lean.identity().await {
            Err(GetError::Failed(class, detail)) => {
                assert!(class.retryable(), "{class:?}");
                assert!(detail.contains("metadata service is down"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn credentials_are_loaded_once_and_again_before_they_expire() {
        assert_eq!(loads(Some(Duration::from_secs(3600)), 50).await, 1);
        assert_eq!(loads(None, 50).await, 1);
        // Expired already (a broken source): each request asks again
        // rather than signing with what is known to be refused.
        assert_eq!(loads(Some(Duration::ZERO), 3).await, 3);
    }

    #[tokio::test]
    async fn without_a_credential_source_every_get_is_refused_as_systemic() {
        let sdk = SdkConfig::builder().build();
        let lean = LeanS3::new(&sdk, "http://127.0.0.1:1", true);
        match lean.identity().await {
            Err(GetError::Failed(ErrorClass::Systemic, detail)) => {
                assert!(detail.contains("credentials"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }
}
