//! Group commit: the writes that wait for the writer lock while another commits are
//! committed together, in one redb transaction and one fsync, each still its own
//! revision with its own watch events.
//!
//! An fsync costs a write far more than its work in the tree (about 0.5 ms against
//! microseconds on the machine of `docs/benchmarks.md`), so with writes committed one
//! by one the store takes at most one write per fsync, however many callers wait. Here
//! a caller queues its write and takes the writer lock; whoever holds it takes every
//! write queued, applies them in queue order (each sealed as the next revision, as if
//! committed alone), commits once, publishes each revision to the watchers in order,
//! and answers each caller. A caller whose write a previous holder took finds its
//! answer when it gets the lock, and returns.
//!
//! What each caller sees is what it would see alone: its compares evaluated against
//! every write before it, its own revision, its own error. A write refused without
//! changing anything (a compare that fails is not an error; a lease not found, an
//! invalid argument) is answered alone and the group goes on. A failure after a write
//! changed the tree (an I/O error) aborts the whole transaction: every write of the
//! group gets that error and none is committed, as a lone write's would be.
//!
//! The queue holds at most one write per blocked caller: writes run on tokio's
//! blocking pool, which bounds the callers.

use std::any::Any;
use std::sync::mpsc::{SyncSender, sync_channel};

use super::{Batch, Event, Inner, Writer, publish};
use crate::{Revision, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// What a write answers: its value and its revision.
type Answer = Result<(Box<dyn Any + Send>, Revision)>;

/// A write's work on the batch, its value erased.
type Run = Box<dyn FnOnce(&mut Batch<'_>) -> Result<Box<dyn Any + Send>> + Send>;

/// A write waiting in the queue.
pub(super) struct Job {
    run: Run,
    reply: SyncSender<Answer>,
}

impl Inner {
    /// Runs `f` as one revision of a group commit (see the module docs): its value and
    /// its revision (the current one when it changed nothing).
    pub(super) fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<R> + Send + 'static,
    ) -> Result<(R, Revision)> {
        let (reply, answer) = sync_channel(1);
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Job {
                run: Box::new(move |b| f(b).map(|r| Box::new(r) as Box<dyn Any + Send>)),
                reply,
            });
        let answered = {
            let mut writer = self.lock_writer()?;
            // Taken and answered by a previous holder? Otherwise it is still queued:
            // a holder answers every write it takes before it lets the lock go.
            match answer.try_recv() {
                Ok(a) => a,
                Err(_) => {
                    let jobs =
                        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
                    self.commit_group(&mut writer, jobs);
                    answer
                        .try_recv()
                        .map_err(|_| StoreError::Backend("a write was not answered".into()))?
                }
            }
        };
        let (value, revision) = answered?;
        let value = value
            .downcast::<R>()
            .map_err(|_| StoreError::Backend("a write answered the wrong type".into()))?;
        Ok((*value, revision))
    }

    /// Applies `jobs` in one transaction, commits it, publishes and answers each.
    fn commit_group(&self, writer: &mut Writer, jobs: Vec<Job>) {
        let txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => return fail_all(jobs, StoreError::Backend(format!("begin write: {e}"))),
        };
        let mut answers: Vec<(SyncSender<Answer>, Answer)> = Vec::with_capacity(jobs.len());
        let mut revisions: Vec<Vec<Event>> = Vec::new();
        let outcome = {
            let mut batch = match Batch::open(&txn) {
                Ok(b) => b,
                Err(e) => return fail_all(jobs, e),
            };
            let mut fatal = None;
            let mut jobs = jobs.into_iter();
            for job in jobs.by_ref() {
                let dirty_before = batch.dirty;
                match (job.run)(&mut batch) {
                    Ok(value) => match batch.seal() {
                        Ok((events, rev)) => {
                            if !events.is_empty() {
                                revisions.push(events);
                            }
                            answers.push((job.reply, Ok((value, rev))));
                        }
                        Err(e) => {
                            fatal = Some((e, job.reply));
                            break;
                        }
                    },
                    Err(e)
                        if refused_unchanged(&e)
                            && batch.events.is_empty()
                            && batch.dirty == dirty_before =>
                    {
                        answers.push((job.reply, Err(e)));
                    }
                    Err(e) => {
                        fatal = Some((e, job.reply));
                        break;
                    }
                }
            }
            match fatal {
                Some((e, reply)) => Err((e, Some(reply), jobs.collect::<Vec<_>>())),
                None => batch
                    .finish(self.options.history_events)
                    .map_err(|e| (e, None, Vec::new())),
            }
        };
        let (changed, floor) = match outcome {
            Ok(done) => done,
            Err((e, reply, rest)) => {
                let _ = txn.abort();
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e.clone()));
                }
                for (reply, _) in answers {
                    let _ = reply.send(Err(e.clone()));
                }
                return fail_all(rest, e);
            }
        };
        if changed {
            if let Err(e) = txn.commit() {
                let e = StoreError::Backend(format!("commit: {e}"));
                for (reply, _) in answers {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if let Err(e) = txn.abort() {
            tracing::warn!("abort of an unchanged write: {e}");
        }
        if let Some(f) = floor {
            writer.history_floor = f;
        }
        for events in revisions {
            publish(writer, events);
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }
}

/// Whether `e` is a refusal that a write reports before it changes anything.
fn refused_unchanged(e: &StoreError) -> bool {
    matches!(e, StoreError::LeaseNotFound(_) | StoreError::Invalid(_))
}

/// Answers every write of `jobs` with `e`.
fn fail_all(jobs: Vec<Job>, e: StoreError) {
    for job in jobs {
        let _ = job.reply.send(Err(e.clone()));
    }
}
