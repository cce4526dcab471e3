//! The operator console (issue #14), its JSON API so far: the thresholds
//! in force and their history, and changing them for every instance.
//!
//! `GET /api/thresholds` is open (bind `console.listen` to loopback or put
//! it behind access control); `POST /api/thresholds` needs
//! `Authorization: Bearer <console.token>`, compared in constant time, and
//! writes the change to `console.control_topic`, which every instance
//! reads. Without the token nothing changes (403).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pipeline::control::{self, Live, Thresholds};

#[derive(Clone)]
struct Console {
    live: Arc<Live>,
    producer: FutureProducer,
    topic: String,
    token: Arc<String>,
    labels: Arc<Vec<String>>,
}

/// Serves the console until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    live: Arc<Live>,
    producer: FutureProducer,
    config: &crate::Config,
    stop: CancellationToken,
) {
    let state = Console {
        live,
        producer,
        topic: config.console.control_topic.clone(),
        // A token read from a file often ends in a newline.
        token: Arc::new(config.console.token.0.trim().to_string()),
        labels: Arc::new(config.endpoint.labels.clone()),
    };
    let app = Router::new()
        .route("/api/thresholds", get(current).post(change))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "console stopped");
    }
}

async fn current(State(c): State<Console>) -> Response {
    Json(serde_json::json!({
        "current": *c.live.get(),
        "history": c.live.history(),
    }))
    .into_response()
}

/// A change asked for: the default threshold and, optionally, per-label
/// ones (replacing them all), and who asks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    threshold: f64,
    #[serde(default)]
    label_thresholds: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    by: Option<String>,
}

/// Whether `headers` carry `Authorization: Bearer <token>`; never with an
/// empty token. The comparison takes the same time wherever they differ.
fn authorised(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

async fn change(State(c): State<Console>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorised(&headers, &c.token) {
        tracing::warn!("console: a change without the right token was refused");
        return (
            StatusCode::FORBIDDEN,
            "changes need Authorization: Bearer <console.token>\n",
        )
            .into_response();
    }
    let asked: Change = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"threshold\": 0.9, \"label_thresholds\": {{…}}, \"by\": \"…\"}}: {e}\n"),
            )
                .into_response()
        }
    };
    let t = Thresholds {
        schema: control::SCHEMA.into(),
        threshold: asked.threshold,
        label_thresholds: asked.label_thresholds,
        by: asked
            .by
            .filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| "console".into()),
        at: crate::record::now_rfc3339(),
    }
    .tidy();
    if let Err(e) = t.check(&c.labels) {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    match control::publish(&c.producer, &c.topic, &t).await {
        Ok(()) => {
            tracing::info!(threshold = t.threshold, label_thresholds = ?t.label_thresholds, by = %t.by,
                "console: thresholds change written to the control topic");
            (StatusCode::OK, Json(t)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: the change could not be written");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_authorised() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(authorised(&with("Bearer s3cret"), "s3cret"));
        assert!(!authorised(&with("Bearer s3cre"), "s3cret"));
        assert!(!authorised(&with("Bearer s3cret!"), "s3cret"));
        assert!(!authorised(&with("s3cret"), "s3cret"));
        assert!(!authorised(&HeaderMap::new(), "s3cret"));
        // No token configured: nothing is authorised.
        assert!(!authorised(&with("Bearer "), ""));
    }
}
