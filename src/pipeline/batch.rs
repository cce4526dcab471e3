//! Batch: micro-batches by image count, total bytes and a maximum wait.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::BatchConfig;

/// The batching decision, without I/O.
#[derive(Debug)]
pub struct Batcher<T> {
    max_images: usize,
    max_bytes: u64,
    max_wait: Duration,
    items: Vec<T>,
    bytes: u64,
    opened: Option<Instant>,
}

impl<T> Batcher<T> {
    pub fn new(config: &BatchConfig) -> Batcher<T> {
        Batcher {
            max_images: config.max_images.max(1),
            max_bytes: config.max_bytes.max(1),
            max_wait: config.max_wait,
            items: Vec::new(),
            bytes: 0,
            opened: None,
        }
    }

    /// Adds an item of `size` bytes; returns the batches that are now complete
    /// (none, one, or two when the item did not fit the open batch and fills
    /// its own).
    pub fn push(&mut self, item: T, size: u64, now: Instant) -> Vec<Vec<T>> {
        let mut out = Vec::new();
        if !self.items.is_empty() && self.bytes + size > self.max_bytes {
            out.extend(self.take());
        }
        if self.items.is_empty() {
            self.opened = Some(now);
        }
        self.items.push(item);
        self.bytes += size;
        if self.items.len() >= self.max_images || self.bytes >= self.max_bytes {
            out.extend(self.take());
        }
        out
    }

    /// When the open batch must go, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.max_wait)
    }

    /// Closes the open batch.
    pub fn take(&mut self) -> Option<Vec<T>> {
        self.opened = None;
        self.bytes = 0;
        if self.items.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.items))
        }
    }
}

/// Reads `(item, size)` and sends batches until the input closes; the last
/// partial batch is sent too.
pub async fn run<T: Send>(
    config: BatchConfig,
    mut rx: mpsc::Receiver<(T, u64)>,
    tx: mpsc::Sender<Vec<T>>,
) {
    let mut batcher = Batcher::new(&config);
    loop {
        let deadline = batcher.deadline();
        let full = tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some((item, size)) => batcher.push(item, size, Instant::now()),
                None => break,
            },
            _ = sleep_until(deadline), if deadline.is_some() => batcher.take().into_iter().collect(),
        };
        for batch in full {
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    }
    if let Some(batch) = batcher.take() {
        let _ = tx.send(batch).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(images: usize, bytes: u64, wait_ms: u64) -> BatchConfig {
        BatchConfig {
            max_images: images,
            max_bytes: bytes,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    #[test]
    fn closes_on_count() {
        let mut b = Batcher::new(&cfg(3, 1000, 50));
        let t = Instant::now();
        assert!(b.push(1, 10, t).is_empty());
        assert!(b.push(2, 10, t).is_empty());
        assert_eq!(b.push(3, 10, t), vec![vec![1, 2, 3]]);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn closes_on_bytes_and_never_splits_an_item() {
        let mut b = Batcher::new(&cfg(10, 100, 50));
        let t = Instant::now();
        assert!(b.push(1, 60, t).is_empty());
        assert_eq!(b.push(2, 60, t), vec![vec![1]], "2 does not fit beside 1");
        assert_eq!(
            b.push(3, 200, t),
            vec![vec![2], vec![3]],
            "an oversized item goes alone"
        );
        assert!(b.take().is_none());
    }

    #[test]
    fn deadline_starts_with_the_first_item() {
        let mut b = Batcher::new(&cfg(10, 100, 50));
        assert_eq!(b.deadline(), None);
        let t = Instant::now();
        b.push(1, 1, t);
        b.push(2, 1, t + Duration::from_millis(30));
        assert_eq!(b.deadline(), Some(t + Duration::from_millis(50)));
    }

    #[tokio::test(start_paused = true)]
    async fn partial_batches_leave_after_max_wait() {
        let (in_tx, in_rx) = mpsc::channel(10);
        let (out_tx, mut out_rx) = mpsc::channel(10);
        let task = tokio::spawn(run(cfg(10, 1000, 50), in_rx, out_tx));
        let start = Instant::now();
        in_tx.send((1, 1)).await.unwrap();
        in_tx.send((2, 1)).await.unwrap();
        assert_eq!(out_rx.recv().await, Some(vec![1, 2]));
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        in_tx.send((3, 1)).await.unwrap();
        drop(in_tx);
        assert_eq!(out_rx.recv().await, Some(vec![3]), "flushed on close");
        assert_eq!(out_rx.recv().await, None);
        task.await.unwrap();
    }
}
