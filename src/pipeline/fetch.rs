//! Fetch: S3 GetObject with a size cap checked before the body is read,
//! retries on throttling and 5xx, and a magic-byte check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::operation::get_object::GetObjectError;
use bytes::{Bytes, BytesMut};

use crate::clients::aws::{backoff, classify, describe, ErrorClass};
use crate::clients::s3get::{GetError, LeanS3, Object, Target};
use crate::config::FetchConfig;
use crate::pipeline::decode::ImageRef;
use crate::record::DeadLetterReason;

/// Image formats the service accepts, by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    Gif,
    Webp,
    Bmp,
}

impl ImageKind {
    pub fn content_type(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
            ImageKind::Gif => "image/gif",
            ImageKind::Webp => "image/webp",
            ImageKind::Bmp => "image/bmp",
        }
    }
}

/// The image format announced by the first bytes, if any.
pub fn sniff(bytes: &[u8]) -> Option<ImageKind> {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => Some(ImageKind::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(ImageKind::Png),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(ImageKind::Gif),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(ImageKind::Webp),
        [b'B', b'M', _, _, _, _, _, _, _, _, _, _, _, _, ..] => Some(ImageKind::Bmp),
        _ => None,
    }
}

/// An image read from S3.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub body: Bytes,
    pub kind: ImageKind,
    /// The ETag S3 answered with (used for the id when the event had none).
    pub etag: Option<String>,
    pub duration: Duration,
}

/// Why an image could not be fetched: a dead-letter reason and a detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct FetchError {
    pub reason: DeadLetterReason,
    pub detail: String,
}

fn fail(reason: DeadLetterReason, detail: impl Into<String>) -> FetchError {
    FetchError {
        reason,
        detail: detail.into(),
    }
}

/// Reads images from S3.
#[derive(Clone)]
pub struct Fetcher {
    client: aws_sdk_s3::Client,
    /// The lean GetObject, unless `aws.s3.lean_get_object` is off.
    lean: Option<Arc<LeanS3>>,
    config: FetchConfig,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

enum Attempt {
    Done(Result<Fetched, FetchError>),
    Retry(ErrorClass, String),
}

impl Fetcher {
    /// GetObjects go through `lean` when given, else through `client`,
    /// which also serves the buckets `lean` cannot.
    pub fn new(
        client: aws_sdk_s3::Client,
        lean: Option<LeanS3>,
        config: FetchConfig,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Fetcher {
        Fetcher {
            client,
            lean: lean.map(Arc::new),
            config,
            metrics,
        }
    }

    /// `fetch.max_object_bytes`: larger objects are refused unread.
    pub fn max_object_bytes(&self) -> u64 {
        self.config.max_object_bytes
    }

    /// Fetches one image, retrying what retrying can help.
    pub async fn fetch(&self, img: &ImageRef) -> Result<Fetched, FetchError> {
        let max = self.config.max_object_bytes;
        if let Some(size) = img.size {
            if size > max {
                return Err(fail(
                    DeadLetterReason::ObjectTooLarge,
                    format!("event says {size} bytes; fetch.max_object_bytes is {max}"),
                ));
            }
        }
        let began = Instant::now();
        let mut last = String::new();
        for attempt in 0..self.config.max_attempts {
            if attempt > 0 {
                self.metrics.fetch_retries.inc();
                tokio::time::sleep(backoff(
                    attempt,
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                ))
                .await;
            }
            let outcome = match tokio::time::timeout(self.config.timeout, self.attempt(img)).await {
                Ok(o) => o,
                Err(_) => Attempt::Retry(
                    ErrorClass::Timeout,
                    format!(
                        "no complete answer within fetch.timeout ({})",
                        humantime::format_duration(self.config.timeout)
                    ),
                ),
            };
            match outcome {
                Attempt::Done(mut result) => {
                    if let Ok(f) = &mut result {
                        self.metrics.images_fetched.inc();
                        self.metrics.fetched_bytes.inc_by(f.body.len() as u64);
                        // The metric: this GetObject; the record: the whole
                        // fetch, retries and back-offs included.
                        self.metrics
                            .fetch_duration
                            .observe(f.duration.as_secs_f64());
                        f.duration = began.elapsed();
                    }
                    return result;
                }
                Attempt::Retry(class, detail) => {
                    tracing::debug!(bucket = %img.bucket, key = %img.key, attempt, kind = class.as_str(), %detail, "s3 get failed, retrying");
                    last = detail;
                }
            }
        }
        Err(fail(
            DeadLetterReason::FetchFailed,
            format!(
                "GetObject failed {} times; last: {last}",
                self.config.max_attempts
            ),
        ))
    }

    /// One GetObject and its body; `Fetched::duration` is its time alone.
    async fn attempt(&self, img: &ImageRef) -> Attempt {
        let start = Instant::now();
        let got = match &self.lean {
            Some(lean) => match lean.target(&img.bucket).await {
                Target::Lean(endpoint) => {
                    lean.get(&endpoint, &img.key, img.version_id.as_deref())
                        .await
                }
                Target::Sdk(_) => self.sdk_get(img).await,
                Target::Invalid(why) => {
                    Err(GetError::Failed(ErrorClass::Rejected, why.to_string()))
                }
            },
            None => self.sdk_get(img).await,
        };
        let resp = match got {
            Ok(r) => r,
            Err(GetError::NotFound) => {
                return Attempt::Done(Err(fail(
                    DeadLetterReason::ObjectNotFound,
                    format!(
                        "s3://{}/{} does not exist (deleted after the event?)",
                        img.bucket, img.key
                    ),
                )))
            }
            Err(GetError::Failed(class, detail)) => {
                return if class.retryable() {
                    Attempt::Retry(class, detail)
                } else {
                    Attempt::Done(Err(fail(DeadLetterReason::FetchFailed, detail)))
                };
            }
        };
        let max = self.config.max_object_bytes;
        if let Some(len) = resp.content_length {
            if len > max {
                return Attempt::Done(Err(fail(
                    DeadLetterReason::ObjectTooLarge,
                    format!("object is {len} bytes; fetch.max_object_bytes is {max}"),
                )));
            }
        }
        let etag = resp.etag;
        let capacity = resp.content_length.unwrap_or(0).min(max) as usize;
        let mut body = resp.body;
        let mut buf = BytesMut::with_capacity(capacity);
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    if (buf.len() + chunk.len()) as u64 > max {
                        return Attempt::Done(Err(fail(
                            DeadLetterReason::ObjectTooLarge,
                            format!("object is over fetch.max_object_bytes ({max}) while reading"),
                        )));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Attempt::Retry(
                        ErrorClass::Network,
                        format!("reading the body failed: {e}"),
                    )
                }
            }
        }
        let body = buf.freeze();
        let Some(kind) = sniff(&body) else {
            return Attempt::Done(Err(fail(
                DeadLetterReason::NotAnImage,
                if body.is_empty() {
                    "object is empty (0 bytes)".to_string()
                } else {
                    format!(
                        "first bytes {:02x?} are not JPEG, PNG, GIF, WebP or BMP",
                        &body[..body.len().min(8)]
                    )
                },
            )));
        };
        Attempt::Done(Ok(Fetched {
            body,
            kind,
            etag,
            duration: start.elapsed(),
        }))
    }

    /// GetObject through the SDK, its answer as the lean path gives it.
    async fn sdk_get(&self, img: &ImageRef) -> Result<Object, GetError> {
        let mut req = self.client.get_object().bucket(&img.bucket).key(&img.key);
        if let Some(v) = &img.version_id {
            req = req.version_id(v);
        }
        match req.send().await {
            Ok(r) => Ok(Object {
                // A negative length is as good as none: the body is
                // counted as it is read.
                content_length: r.content_length().and_then(|l| u64::try_from(l).ok()),
                etag: r.e_tag().map(|e| e.trim_matches('"').to_string()),
                body: r.body,
            }),
            Err(err) => {
                let not_found =
                    matches!(err.as_service_error(), Some(GetObjectError::NoSuchKey(_)))
                        || err.raw_response().map(|r| r.status().as_u16()) == Some(404);
                if not_found {
                    Err(GetError::NotFound)
                } else {
                    Err(GetError::Failed(classify(&err), describe(&err)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_five_formats() {
        assert_eq!(
            sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]),
            Some(ImageKind::Jpeg)
        );
        assert_eq!(
            sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"),
            Some(ImageKind::Png)
        );
        assert_eq!(sniff(b"GIF89a\x01\x00"), Some(ImageKind::Gif));
        assert_eq!(sniff(b"GIF87a\x01\x00"), Some(ImageKind::Gif));
        assert_eq!(sniff(b"RIFF\x24\0\0\0WEBPVP8 "), Some(ImageKind::Webp));
        assert_eq!(
            sniff(b"BM\x36\0\0\0\0\0\0\0\x36\0\0\0\x28\0"),
            Some(ImageKind::Bmp)
        );
        assert_eq!(sniff(b"%PDF-1.7"), None);
        assert_eq!(sniff(b"RIFF\x24\0\0\0WAVEfmt "), None);
        assert_eq!(sniff(b"BM"), None);
        assert_eq!(sniff(b""), None);
    }
}
