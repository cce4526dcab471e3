//! inferstream classifies images as they land in S3.
//!
//! ```text
//!  Kafka `s3-events` ──► source ──► decode ──► fetch (S3) ──► batch ──► infer (SageMaker)
//!                          │           │            │                        │
//!                          │           └── skip / dead letter ◄──────────────┤
//!                          │                                                 ▼
//!                          │                                   route (threshold)
//!                          │                                                 ▼
//!                          │          sinks: results / review / dead-letter topics, SNS alerts
//!                          ▼                                                 │
//!                     ack tracker ◄──── every output acknowledged ───────────┘
//!                          │
//!                     commit lowest incomplete offset per partition
//! ```
//!
//! Modules, one per stage: [`source`] (consumer callbacks and commits),
//! [`decode`], [`fetch`], [`batch`], [`infer`], [`route`], [`sink`],
//! [`capture`] (sampled predictions to S3); the
//! wiring in [`pipeline`]; offsets in [`ack`]; [`config`], [`metrics`],
//! [`http`], [`shutdown`]; the local model server in [`endpoint`]; charts
//! from data capture in [`report`].

pub mod app;
pub mod clients;
pub mod config;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod shutdown;
pub mod tools;

pub use config::Config;
pub use pipeline::{start, Service};
