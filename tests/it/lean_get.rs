//! The lean GetObject (`clients::s3get`) against S3 servers that check what
//! it sends: the demo's embedded S3 (s3s) verifies every SigV4 signature,
//! moto keeps object versions.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_sdk_s3::primitives::ByteStream;
use inferstream::clients::aws::ErrorClass;
use inferstream::clients::s3get::{Endpoint, GetError, LeanS3, Object, Target};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::harness::{aws_config, s3_client, Moto};

async fn sdk(url: &str, key: &str, secret: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(key, secret, None, None, "tests"))
        .endpoint_url(url)
        .load()
        .await
}

async fn endpoint(lean: &LeanS3, bucket: &str) -> Arc<Endpoint> {
    match lean.target(bucket).await {
        Target::Lean(e) => e,
        other => panic!("bucket {bucket} should take the lean path, got {other:?}"),
    }
}

async fn bytes(object: Object) -> Vec<u8> {
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn lean_gets_are_signed_so_that_s3_accepts_them_for_any_key() {
    let root = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let addr = inferstream::tools::demo::serve_s3(root.path(), "AKIDLEAN", "lean-secret", stop)
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let config = sdk(&url, "AKIDLEAN", "lean-secret").await;
    let s3 = s3_client(&config);
    s3.create_bucket().bucket("images").send().await.unwrap();
    let lean = LeanS3::new(&config, &url, true);
    let at = endpoint(&lean, "images").await;
    // Every character class the key encoding and the canonical request
    // must agree on.
    let keys = [
        "plain.png",
        "with space.png",
        "plus+equals=amp&semi;.png",
        "unicode/é✓ü.png",
        "deep/a/b/c.png",
        "query?hash#percent%25.png",
        "tilde~under_score-dot.png",
        "brackets[1](2){3}'quote'!*,$@:.png",
    ];
    for (i, key) in keys.iter().enumerate() {
        let body = format!("object {i}: {key}").into_bytes();
        let put = s3
            .put_object()
            .bucket("images")
            .key(*key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap();
        let got = match lean.get(&at, key, None).await {
            Ok(o) => o,
            Err(e) => panic!("GET {key:?}: {e:?}"),
        };
        assert_eq!(got.content_length, Some(body.len() as u64), "{key}");
        assert_eq!(
            got.etag.as_deref(),
            put.e_tag().map(|e| e.trim_matches('"')),
            "{key}"
        );
        assert_eq!(bytes(got).await, body, "{key}");
    }
    assert_eq!(
        lean.get(&at, "no/such/key.png", None).await.err(),
        Some(GetError::NotFound)
    );

    // A wrong secret is refused by the server's signature check: every
    // request would be, so the error is systemic, and it names the code.
    let wrong = LeanS3::new(&sdk(&url, "AKIDLEAN", "not-the-secret").await, &url, true);
    let at = endpoint(&wrong, "images").await;
    match wrong.get(&at, "plain.png", None).await {
        Err(GetError::Failed(ErrorClass::Systemic, detail)) => {
            assert!(detail.contains("SignatureDoesNotMatch"), "{detail}");
            assert!(detail.contains("HTTP 403"), "{detail}");
            assert!(!detail.contains("not-the-secret"), "{detail}");
        }
        other => panic!("a wrong secret should be refused as systemic: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lean_get_with_a_version_id_reads_that_version() {
    let moto = Moto::start().await;
    let config = aws_config(&moto.url).await;
    let s3 = s3_client(&config);
    s3.create_bucket().bucket("versioned").send().await.unwrap();
    s3.put_bucket_versioning()
        .bucket("versioned")
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut versions = Vec::new();
    for body in ["first", "second"] {
        let put = s3
            .put_object()
            .bucket("versioned")
            .key("cat photo+1.png")
            .body(ByteStream::from(body.as_bytes().to_vec()))
            .send()
            .await
            .unwrap();
        versions.push(put.version_id().unwrap().to_string());
    }
    let lean = LeanS3::new(&config, &moto.url, true);
    let at = endpoint(&lean, "versioned").await;
    let key = "cat photo+1.png";
    let first = lean.get(&at, key, Some(&versions[0])).await.unwrap();
    assert_eq!(bytes(first).await, b"first");
    let latest = lean.get(&at, key, None).await.unwrap();
    assert_eq!(bytes(latest).await, b"second");
    assert!(
        lean.get(&at, key, Some("no-such-version")).await.is_err(),
        "an unknown version must not read the latest"
    );
}
