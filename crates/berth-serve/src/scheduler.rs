//! One worker thread per model: it takes the packed batches that concurrent requests submit,
//! merges as many as fit in `--max-batch-tokens` real tokens into one forward pass (no
//! padding: the batches are concatenated), and hands each request its own rows back.
//! Requests tokenize and pack on their own threads, so the next batch is ready while one
//! runs.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use berth_model::{Batch, Model};
use berth_tasks::{BatchRunner, TaskError};
use candle_core::Tensor;

use crate::metrics::{secs, Metrics, ModelLabels};

struct Submission {
    batch: Batch,
    queued: Instant,
    reply: mpsc::SyncSender<berth_tasks::Result<Tensor>>,
}

/// The queue of one model.
pub struct Scheduler {
    tx: mpsc::Sender<Submission>,
    labels: ModelLabels,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Starts the worker thread of `model`. It ends when the scheduler is dropped.
    pub fn start(
        name: &str,
        model: Arc<Model>,
        max_batch_tokens: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let labels = ModelLabels {
            model: name.to_string(),
        };
        let worker = Worker {
            model,
            rx,
            budget: max_batch_tokens,
            labels: labels.clone(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name(format!("berth-batch-{name}"))
            .spawn(move || worker.run())?;
        Ok(Arc::new(Scheduler {
            tx,
            labels,
            metrics,
        }))
    }

    /// A [`BatchRunner`] for one request (it records the request's tokenization time).
    pub fn runner(self: &Arc<Self>) -> Arc<dyn BatchRunner> {
        Arc::new(RequestRunner {
            scheduler: self.clone(),
            started: Instant::now(),
            submitted: AtomicBool::new(false),
        })
    }
}

struct RequestRunner {
    scheduler: Arc<Scheduler>,
    started: Instant,
    submitted: AtomicBool,
}

impl BatchRunner for RequestRunner {
    fn forward(&self, batch: &Batch) -> berth_tasks::Result<Tensor> {
        let s = &self.scheduler;
        if !self.submitted.swap(true, Ordering::Relaxed) {
            s.metrics
                .tokenization_seconds
                .get_or_create(&s.labels)
                .observe(secs(self.started.elapsed()));
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let depth = s.metrics.queue_depth.get_or_create(&s.labels).clone();
        depth.inc();
        let sent = s.tx.send(Submission {
            batch: batch.clone(),
            queued: Instant::now(),
            reply,
        });
        if sent.is_err() {
            depth.dec();
            return Err(stopped());
        }
        answer.recv().map_err(|_| stopped())?
    }
}

fn stopped() -> TaskError {
    TaskError::Runner("the model's batching worker has stopped".into())
}

struct Worker {
    model: Arc<Model>,
    rx: mpsc::Receiver<Submission>,
    budget: usize,
    labels: ModelLabels,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self) {
        let mut carry: Option<Submission> = None;
        loop {
            let first = match carry.take() {
                Some(s) => s,
                None => match self.rx.recv() {
                    Ok(s) => s,
                    Err(_) => return, // every sender is gone: the server stopped
                },
            };
            // Merge what is waiting, in arrival order, up to the token budget; the first
            // submission that does not fit starts the next batch.
            let mut tokens = first.batch.num_tokens();
            let mut subs = vec![first];
            while tokens < self.budget {
                match self.rx.try_recv() {
                    Ok(s) if tokens + s.batch.num_tokens() > self.budget => {
                        carry = Some(s);
                        break;
                    }
                    Ok(s) => {
                        tokens += s.batch.num_tokens();
                        subs.push(s);
                    }
                    Err(_) => break,
                }
            }
            self.run_batch(subs);
        }
    }

    fn run_batch(&self, subs: Vec<Submission>) {
        let m = &self.metrics;
        m.queue_depth
            .get_or_create(&self.labels)
            .dec_by(subs.len() as i64);
        let mut merged = Batch::default();
        for s in &subs {
            m.queue_seconds
                .get_or_create(&self.labels)
                .observe(secs(s.queued.elapsed()));
            merged.append(&s.batch);
        }
        m.batch_tokens
            .get_or_create(&self.labels)
            .observe(merged.num_tokens() as f64);
        m.batch_inputs
            .get_or_create(&self.labels)
            .observe(merged.num_sequences() as f64);
        let t = Instant::now();
        // A panic in the encoder fails this batch's requests, never the worker (which would
        // leave every later request waiting).
        let hidden = catch_unwind(AssertUnwindSafe(|| self.model.forward(&merged)));
        m.inference_seconds
            .get_or_create(&self.labels)
            .observe(secs(t.elapsed()));
        match hidden {
            Ok(Ok(hidden)) => {
                let mut offset = 0;
                for s in subs {
                    let n = s.batch.num_tokens();
                    // A copy: the caller's kernels read their input from its first element.
                    let rows = hidden
                        .narrow(0, offset, n)
                        .and_then(|t| t.copy())
                        .map_err(TaskError::from);
                    offset += n;
                    let _ = s.reply.send(rows); // the request may have given up
                }
            }
            Ok(Err(e)) => fail(subs, &format!("the encoder failed: {e}")),
            Err(_) => fail(subs, "the encoder panicked on this batch"),
        }
    }
}

fn fail(subs: Vec<Submission>, message: &str) {
    for s in subs {
        let _ = s.reply.send(Err(TaskError::Runner(message.to_string())));
    }
}
