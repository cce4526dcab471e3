//! The outside systems' clients, owned by no stage: AWS (S3, SageMaker
//! Runtime, SNS) with the one function that decides what is retryable, the
//! lean GetObject of the fetch stage, and the librdkafka properties of the
//! consumer and the producer.

pub mod aws;
pub mod kafka;
pub mod s3get;
