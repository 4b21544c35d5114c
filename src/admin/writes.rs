//! Writes to the sync file, coalesced: API calls queue their change; one thread takes every
//! change waiting, applies them in order to one read of the file, validates and writes it once
//! (the same locked, atomic edit as `keygate keys`), puts the table that validated it in force
//! on the gateway, and only then answers each caller. A hundred concurrent creates cost one or a few rewrites, not a hundred.
//!
//! A batch that touches only keys, accounts and ids is journaled (one line appended to
//! `<sync file>.journal`, [`crate::core::journal`]) rather than rewriting the file; a second
//! after the last write, this thread folds the journal into the file ([`SyncEditor::compact`]).

use super::http::ApiError;
use crate::core::config::SyncFile;
use crate::sync::edit::SyncEditor;
use crate::sync::reload::{ReloadOutcome, Reloader};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// How long the writer waits without a write before it folds the journal into the file.
const COMPACT_AFTER: Duration = Duration::from_secs(1);

/// A change to the file. It must check everything it can before it mutates anything: an
/// `Err` leaves the file as it found it.
pub type Change = Box<dyn Fn(&mut SyncFile) -> Result<serde_json::Value, ApiError> + Send>;

/// What a write answers: the change's own value and the revision now in force.
pub type Written = Result<(serde_json::Value, u64), ApiError>;

struct Job {
    change: Change,
    if_match: Option<u64>,
    reply: tokio::sync::oneshot::Sender<Written>,
}

/// The most changes applied in one rewrite.
const MAX_BATCH: usize = 512;

/// The queue of writes and its thread.
#[derive(Clone)]
pub struct Writer {
    jobs: Sender<Job>,
}

impl Writer {
    /// Start the writer thread for `editor`'s file, reloading through `reloader`.
    pub fn start(editor: SyncEditor, reloader: Arc<Reloader>) -> std::io::Result<Writer> {
        let (jobs, rx) = channel();
        std::thread::Builder::new()
            .name("keygate-admin-writes".into())
            .spawn(move || run(&editor, &reloader, &rx))?;
        Ok(Writer { jobs })
    }

    /// Apply `change` (only if the file is at revision `if_match`, when given); answers once
    /// the new table is in force on this gateway.
    pub async fn write(&self, if_match: Option<u64>, change: Change) -> Written {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job {
                change,
                if_match,
                reply,
            })
            .map_err(|_| ApiError::unavailable("the writer has stopped"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("the write was lost"))?
    }
}

fn run(editor: &SyncEditor, reloader: &Reloader, rx: &Receiver<Job>) {
    let mut held: Option<Job> = None;
    // Written since the last compaction.
    let mut dirty = false;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None if dirty => match rx.recv_timeout(COMPACT_AFTER) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    dirty = false;
                    if let Err(e) = editor.compact(|digest| reloader.compacted(digest)) {
                        log::error!("admin: folding the journal into the sync file: {e}");
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        dirty = true;
        let mut batch = vec![first];
        // A conditional write goes alone: it must see the revision the caller saw, not one an
        // earlier change of its batch is about to move on.
        if batch[0].if_match.is_none() {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) if j.if_match.is_some() => {
                        held = Some(j);
                        break;
                    }
                    Ok(j) => batch.push(j),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
        }
        apply(editor, reloader, batch);
    }
}

fn apply(editor: &SyncEditor, reloader: &Reloader, batch: Vec<Job>) {
    // A change that panics fails its batch, not the writer (every later write would get 503).
    // Nothing half-edited survives it: the editor keeps no parse of an edit that did not end.
    let attempted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        attempt(editor, reloader, &batch)
    }))
    .unwrap_or_else(|_| {
        Err(ApiError::internal(
            "the write failed; see the gateway's log",
        ))
    });
    match attempted {
        Ok((outcomes, revision)) => {
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome.map(|v| (v, revision)));
            }
        }
        Err(e) if batch.len() > 1 => {
            // One change made the whole file invalid (what no check before it could see, such
            // as two keys over an account's max_keys): apply them one by one, so only the
            // faulty one fails.
            log::debug!(
                "admin: a batch of {} failed ({}); one by one",
                batch.len(),
                e.message
            );
            for job in batch {
                apply(editor, reloader, vec![job]);
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

type Outcomes = Vec<Result<serde_json::Value, ApiError>>;

fn attempt(
    editor: &SyncEditor,
    reloader: &Reloader,
    batch: &[Job],
) -> Result<(Outcomes, u64), ApiError> {
    let mut published = None;
    let (outcomes, written) = editor
        .edit_publish(
            |file| {
                let mut changed = false;
                let outcomes: Outcomes = batch
                    .iter()
                    .map(|job| {
                        if let Some(rev) = job.if_match.filter(|r| *r != file.revision) {
                            return Err(ApiError::stale(rev, file.revision));
                        }
                        let r = (job.change)(file);
                        changed |= r.is_ok();
                        r
                    })
                    .collect();
                (outcomes, changed)
            },
            // The table that validated the file goes in force as it is: no second read.
            |table| published = Some(reloader.publish_table(table)),
        )
        .map_err(invalid)?;
    match (written, published) {
        (None, _) => Ok((outcomes, reloader.gate_revision())),
        (Some(_), Some(ReloadOutcome::Reloaded { revision, .. })) => Ok((outcomes, revision)),
        (Some(rev), other) => {
            // Written (so never to be applied again) but not in force: a publish of a compiled
            // table cannot be refused, so this is not expected.
            log::error!(
                "admin: the sync file was written (revision {rev}) but not put in force: {other:?}"
            );
            let failed = ApiError::internal(
                "the sync file was written but not loaded; see the gateway's log",
            );
            Ok((
                outcomes
                    .into_iter()
                    .map(|o| o.and(Err(failed.clone())))
                    .collect(),
                rev,
            ))
        }
    }
}

/// A validation failure of the edited file as a 400, naming the field when the message does.
fn invalid(message: String) -> ApiError {
    let field = [
        ("CIDR", "allow_ips"),
        ("allow_ips", "allow_ips"),
        ("unknown group", "group"),
        ("max_keys", "account"),
        ("account", "account"),
        ("model", "models"),
        ("budget", "budget"),
        ("limits", "limits"),
        ("name", "name"),
        ("quota", "quota"),
    ]
    .iter()
    .find(|(needle, _)| message.contains(needle))
    .map(|(_, f)| *f);
    match field {
        Some(f) => ApiError::field(f, message),
        None => ApiError::bad(message),
    }
}
