//! The local journal: the durable store of the desired state on one VM: a snapshot plus an append-only journal of group
//! commits, so a change is acknowledged only once it is on disk and a `kill -9` at any instant
//! leaves a directory [`Store::open`] can load.
//!
//! The I/O is synchronous (`std::fs`) on purpose: `fsync` blocks a thread whatever the API, and
//! one owner serializes the changes anyway. The caller runs the store on a thread of its own (or
//! in `spawn_blocking`), never on the async runtime's threads, and hands it whole batches:
//! every request that arrived while the previous `fsync` ran goes into the next
//! [`Store::commit`], which costs one `fsync` for the lot (group commit).
//!
//! # Layout of the state directory
//!
//! - `snapshot.json`: the whole [`DesiredState`] at some generation. Only ever replaced whole:
//!   written to `snapshot.json.tmp`, fsync'd, renamed over, then the directory is fsync'd, so
//!   it is always the old or the new snapshot, never a mix.
//! - `journal.log`: one line per group commit since (about) that snapshot:
//!   `<crc32 of the JSON, 8 lowercase hex digits> <JSON>\n`, the JSON being
//!   `{"generation": <generation after the batch>, "changes": [Change, ...]}`.
//! - `lock`: held with `flock` while a [`Store`] is open, so two agents cannot share the
//!   directory. The kernel drops it when the process dies, even by `kill -9`.
//!
//! # Why a crash cannot lose or invent acknowledged data
//!
//! A commit appends its line and calls `fdatasync` once; only then is it acknowledged. Only one
//! commit is ever in flight, so a crash can tear at most the last line of the journal, and that
//! line was never acknowledged: [`Store::open`] drops it (with a warning). Any other bad line is
//! corruption of acknowledged data and a hard error, never silently skipped.
//!
//! Compaction (once the journal reaches [`StoreOptions::compact_after_records`] records or
//! [`StoreOptions::compact_after_bytes`] bytes) writes a new snapshot durably *before*
//! truncating the journal; a crash in between leaves records the snapshot already holds, and
//! replay skips every record whose generation is not above the snapshot's.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{Change, DesiredState};

/// The snapshot's file name in the state directory.
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// The journal's file name in the state directory.
pub const JOURNAL_FILE: &str = "journal.log";
/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";
const SNAPSHOT_TMP_FILE: &str = "snapshot.json.tmp";

/// `<8 hex digits><space>` before the JSON of a record.
const HEADER_LEN: usize = 9;

/// When to fold the journal into a new snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Compact once the journal holds this many records (group commits).
    pub compact_after_records: u64,
    /// Compact once the journal holds this many bytes.
    pub compact_after_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compact_after_records: 10_000,
            compact_after_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Every way the store can fail; each names the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// Another process (or another [`Store`] in this one) has the directory open.
    #[error("state directory {dir} is in use: another lbagent holds the lock on {lock}")]
    Locked { dir: PathBuf, lock: PathBuf },

    /// The snapshot exists but is not a desired state.
    #[error("snapshot {path} is unreadable: {source}")]
    Snapshot {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A journal record that was acknowledged cannot be read or replayed. Nothing is dropped:
    /// the operator has to look at the file.
    #[error("journal {path}: record {record} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        /// 0-based index of the record in the file.
        record: u64,
        /// Byte offset of the record's first byte.
        offset: u64,
        reason: String,
    },

    /// A commit would move the generation backwards: a bug in the caller.
    #[error(
        "commit at generation {requested} after generation {committed}: generations only grow"
    )]
    GenerationWentBack { committed: u64, requested: u64 },

    /// An earlier write or fsync failed, so what the journal holds is unknown (after a failed
    /// fsync the kernel may have dropped the dirty pages). The store takes no more commits:
    /// drop it and the in-memory state, and reopen.
    #[error("the store refuses commits after an earlier failure ({cause}); reopen it")]
    Poisoned { cause: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// A journal record as written.
#[derive(Serialize)]
struct RecordRef<'a> {
    generation: u64,
    changes: &'a [Change],
}

/// A journal record as read back.
#[derive(Deserialize)]
struct Record {
    generation: u64,
    changes: Vec<Change>,
}

/// The durable desired state. One owner; every method does blocking I/O (see the module doc).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    journal_path: PathBuf,
    options: StoreOptions,
    journal: File,
    /// Held for the `flock`; released when the store is dropped or the process dies.
    _lock: File,
    /// Generation of the last committed batch (or of what was loaded).
    generation: u64,
    journal_records: u64,
    journal_bytes: u64,
    /// Thresholds of the next compaction; pushed further after a failed one so a full disk
    /// does not mean a multi-megabyte snapshot attempt on every commit.
    compact_at_records: u64,
    compact_at_bytes: u64,
    /// Reused buffer for encoding records.
    buf: Vec<u8>,
    poisoned: Option<String>,
}

impl Store {
    /// Opens (creating if needed) the state directory with default options; see
    /// [`Store::open_with`].
    pub fn open(dir: impl AsRef<Path>) -> Result<(Store, DesiredState), StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// Opens the state directory, creating it (mode 0700) if missing, takes its lock, and
    /// returns the store with the state it holds: the snapshot (empty if none) plus the
    /// journal's records above the snapshot's generation.
    ///
    /// A torn or CRC-failing *last* record (a crash mid-commit, never acknowledged) is dropped
    /// and the journal truncated before it; any other bad record is [`StoreError::Corrupt`].
    pub fn open_with(
        dir: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<(Store, DesiredState), StoreError> {
        let dir = dir.as_ref().to_path_buf();
        create_dir(&dir)?;
        let lock = take_lock(&dir)?;

        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let mut state = match fs::read(&snapshot_path) {
            Ok(bytes) => serde_json::from_slice::<DesiredState>(&bytes).map_err(|source| {
                StoreError::Snapshot {
                    path: snapshot_path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DesiredState::default(),
            Err(e) => return Err(io_err(&snapshot_path, "read")(e)),
        };
        let snapshot_generation = state.generation;

        let journal_path = dir.join(JOURNAL_FILE);
        let existed = journal_path.exists();
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&journal_path)
            .map_err(io_err(&journal_path, "open"))?;
        if !existed {
            // The new file's directory entry must be durable before a commit is acknowledged.
            sync_dir(&dir)?;
        }
        let bytes = fs::read(&journal_path).map_err(io_err(&journal_path, "read"))?;
        let replay = replay(&journal_path, &bytes, &mut state, snapshot_generation)?;

        if let Some(torn) = &replay.torn {
            tracing::warn!(
                journal = %journal_path.display(),
                offset = replay.good_len,
                dropped_bytes = bytes.len() as u64 - replay.good_len,
                reason = %torn,
                "dropping the journal's last record: torn by a crash mid-commit, never acknowledged"
            );
            truncate(&journal, &journal_path, replay.good_len)?;
        }
        let (mut records, mut len) = (replay.records, replay.good_len);
        if records > 0 && replay.applied == 0 {
            // A compaction was interrupted between the snapshot's rename and the truncation:
            // every record is in the snapshot. Finish it (the snapshot is made durable first).
            sync_dir(&dir)?;
            truncate(&journal, &journal_path, 0)?;
            (records, len) = (0, 0);
        }

        let store = Store {
            dir,
            journal_path,
            options,
            journal,
            _lock: lock,
            generation: state.generation,
            journal_records: records,
            journal_bytes: len,
            compact_at_records: options.compact_after_records,
            compact_at_bytes: options.compact_after_bytes,
            buf: Vec::with_capacity(4096),
            poisoned: None,
        };
        Ok((store, state))
    }

    /// Makes one batch durable: appends one journal record and fsyncs once. Returns only when
    /// the batch is on disk; then (and only then) the caller may acknowledge every change in it.
    ///
    /// `changes` are the changes the caller has applied, in order, to its state, and `state` is
    /// that state afterwards (`state.generation` is the generation after the batch). Changes
    /// that had no effect may be included or left out. An empty batch is a no-op.
    ///
    /// When the journal has grown past the [`StoreOptions`] thresholds, this also writes a new
    /// snapshot of `state` and empties the journal. A failure there is logged and retried after
    /// the journal has grown by the thresholds again; the commit itself is durable and `Ok`.
    ///
    /// After an `Err` the store is poisoned (see [`StoreError::Poisoned`]) and the caller's
    /// in-memory state may be ahead of the disk: drop both and reopen.
    pub fn commit(&mut self, state: &DesiredState, changes: &[Change]) -> Result<(), StoreError> {
        if let Some(cause) = &self.poisoned {
            return Err(StoreError::Poisoned {
                cause: cause.clone(),
            });
        }
        if changes.is_empty() {
            return Ok(());
        }
        if state.generation < self.generation {
            return Err(StoreError::GenerationWentBack {
                committed: self.generation,
                requested: state.generation,
            });
        }
        encode_record(&mut self.buf, state.generation, changes);
        let written = self
            .journal
            .write_all(&self.buf)
            .map_err(io_err(&self.journal_path, "append to"))
            .and_then(|()| {
                self.journal
                    .sync_data()
                    .map_err(io_err(&self.journal_path, "fsync"))
            });
        if let Err(e) = written {
            // A partial line may be in the file, and after a failed fsync the page cache is
            // not to be trusted: appending more could bury a bad record mid-journal.
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        self.generation = state.generation;
        self.journal_records += 1;
        self.journal_bytes += self.buf.len() as u64;
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::with_capacity(4096);
        }

        if self.journal_records >= self.compact_at_records
            || self.journal_bytes >= self.compact_at_bytes
        {
            // The record is durable already, so this commit succeeded whatever compaction
            // does; a compaction that leaves the journal unusable poisons the store, and the
            // next commit reports it.
            if let Err(e) = self.compact(state) {
                tracing::error!(dir = %self.dir.display(), error = %e, "compaction failed");
            }
        }
        Ok(())
    }

    /// Generation of the last durable batch.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `state` as the new snapshot, durably, then empties the journal.
    fn compact(&mut self, state: &DesiredState) -> Result<(), StoreError> {
        if let Err(e) = write_snapshot(&self.dir, state) {
            // Nothing was lost: the journal still holds everything. Try again later.
            tracing::error!(
                dir = %self.dir.display(),
                error = %e,
                "compaction failed; the journal keeps growing until the next attempt"
            );
            self.compact_at_records = self.journal_records + self.options.compact_after_records;
            self.compact_at_bytes = self.journal_bytes + self.options.compact_after_bytes;
            return Ok(());
        }
        // The snapshot is durable; the journal's records are all at or below its generation.
        if let Err(e) = truncate(&self.journal, &self.journal_path, 0) {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        self.journal_records = 0;
        self.journal_bytes = 0;
        self.compact_at_records = self.options.compact_after_records;
        self.compact_at_bytes = self.options.compact_after_bytes;
        Ok(())
    }
}

/// Encodes one record, newline included, into `buf`.
fn encode_record(buf: &mut Vec<u8>, generation: u64, changes: &[Change]) {
    buf.clear();
    buf.extend_from_slice(b"00000000 ");
    serde_json::to_writer(
        &mut *buf,
        &RecordRef {
            generation,
            changes,
        },
    )
    .expect("a Change always serializes to JSON");
    let crc = crc32fast::hash(&buf[HEADER_LEN..]);
    buf[..8].copy_from_slice(format!("{crc:08x}").as_bytes());
    buf.push(b'\n');
}

/// What reading the journal found.
#[derive(Debug)]
struct Replay {
    /// Length of the good records; the rest is a torn tail.
    good_len: u64,
    /// Good records (applied or skipped as already in the snapshot).
    records: u64,
    /// Records applied on top of the snapshot.
    applied: u64,
    /// Why the tail is torn, if it is.
    torn: Option<String>,
}

/// Applies the journal's records above `snapshot_generation` to `state`.
fn replay(
    path: &Path,
    bytes: &[u8],
    state: &mut DesiredState,
    snapshot_generation: u64,
) -> Result<Replay, StoreError> {
    let mut out = Replay {
        good_len: 0,
        records: 0,
        applied: 0,
        torn: None,
    };
    let mut last_generation: Option<u64> = None;
    let mut offset = 0usize;
    while offset < bytes.len() {
        let index = out.records;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            record: index,
            offset: offset as u64,
            reason,
        };
        let rest = &bytes[offset..];
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], offset + end + 1),
            None => (rest, bytes.len()),
        };
        let is_last = next == bytes.len();
        let framing = if next == bytes.len() && !rest.ends_with(b"\n") {
            Err("incomplete record (no final newline)".to_string())
        } else {
            check_frame(line)
        };
        let json = match framing {
            Ok(json) => json,
            // Only one commit is in flight at a time, so only the last line can be torn.
            Err(reason) if is_last => {
                out.torn = Some(reason);
                break;
            }
            Err(reason) => {
                return Err(corrupt(format!(
                    "{reason}; records after it were acknowledged, so this is not a torn tail \
                     and nothing is dropped"
                )))
            }
        };
        // The CRC matched, so the bytes are what was written: any problem from here on is a
        // bug or tampering, not a crash, and is an error even in the last record.
        let record: Record = serde_json::from_slice(json)
            .map_err(|e| corrupt(format!("CRC matches but the JSON is not a record: {e}")))?;
        if let Some(last) = last_generation {
            if record.generation < last {
                return Err(corrupt(format!(
                    "generation {} after generation {last}: generations only grow",
                    record.generation
                )));
            }
        }
        last_generation = Some(record.generation);
        if record.generation > snapshot_generation {
            for (i, change) in record.changes.iter().enumerate() {
                state.apply(change).map_err(|conflict| {
                    corrupt(format!(
                        "change {i} ({} on port {}) does not apply: {conflict}",
                        change_kind(change),
                        change.frontend_port()
                    ))
                })?;
            }
            if state.generation != record.generation {
                return Err(corrupt(format!(
                    "replay reaches generation {} but the record says {}",
                    state.generation, record.generation
                )));
            }
            out.applied += 1;
        }
        out.records += 1;
        out.good_len = next as u64;
        offset = next;
    }
    Ok(out)
}

/// Checks a line's header and CRC; returns its JSON.
fn check_frame(line: &[u8]) -> Result<&[u8], String> {
    if line.len() <= HEADER_LEN || line[HEADER_LEN - 1] != b' ' {
        return Err("malformed record header".to_string());
    }
    let hex = &line[..HEADER_LEN - 1];
    if !hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("malformed record header (CRC is not 8 lowercase hex digits)".to_string());
    }
    let expected = u32::from_str_radix(std::str::from_utf8(hex).expect("hex is ASCII"), 16)
        .expect("8 hex digits fit a u32");
    let json = &line[HEADER_LEN..];
    let actual = crc32fast::hash(json);
    if actual != expected {
        return Err(format!(
            "CRC mismatch (header {expected:08x}, content {actual:08x})"
        ));
    }
    Ok(json)
}

fn change_kind(change: &Change) -> &'static str {
    match change {
        Change::PutServer { .. } => "put_server",
        Change::PutFrontend { .. } => "put_frontend",
        Change::DeleteServer { .. } => "delete_server",
        Change::DeleteFrontend { .. } => "delete_frontend",
        Change::ReplaceFrontend { .. } => "replace_frontend",
    }
}

/// Creates `dir` (mode 0700) if missing, making its entry durable.
fn create_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir, "create directory"))?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Takes the directory's `flock`, without waiting.
fn take_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path, "open"))?;
    // flock(2): released by the kernel when the process dies, even by kill -9.
    let locked = file.try_lock();
    match locked {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: dir.to_path_buf(),
            lock: path,
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path, "lock")(e)),
    }
}

/// Writes `state` to a temporary file, fsyncs it, renames it over the snapshot and fsyncs the
/// directory: when this returns, the new snapshot survives a crash.
fn write_snapshot(dir: &Path, state: &DesiredState) -> Result<(), StoreError> {
    let tmp = dir.join(SNAPSHOT_TMP_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp, "create"))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    serde_json::to_writer(&mut out, state).map_err(|e| StoreError::Io {
        path: tmp.clone(),
        op: "write",
        source: e.into(),
    })?;
    let file = out
        .into_inner()
        .map_err(|e| io_err(&tmp, "write")(e.into_error()))?;
    file.sync_all().map_err(io_err(&tmp, "fsync"))?;
    drop(file);
    let path = dir.join(SNAPSHOT_FILE);
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename the new snapshot to"))?;
    sync_dir(dir)
}

/// Cuts the journal to `len` bytes, durably.
fn truncate(journal: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    journal.set_len(len).map_err(io_err(path, "truncate"))?;
    journal.sync_all().map_err(io_err(path, "fsync"))
}

/// Makes renames and new entries in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, NodeName, ServerSpec, ServerState};

    fn put(port: u16, node: &str, node_port: u16) -> Change {
        Change::PutServer {
            frontend_port: port,
            node: NodeName::new(node).unwrap(),
            mode: Mode::Tcp,
            spec: ServerSpec {
                node_ip: "203.0.113.7".parse().unwrap(),
                node_port,
                state: ServerState::Ready,
                service: Some("traefik".into()),
                weight: None,
                lease: true,
            },
            frontend: None,
        }
    }

    fn del(port: u16, node: &str) -> Change {
        Change::DeleteServer {
            frontend_port: port,
            node: NodeName::new(node).unwrap(),
        }
    }

    /// Applies `changes` to `state` and commits them, as the owner does.
    fn commit(store: &mut Store, state: &mut DesiredState, changes: &[Change]) {
        for c in changes {
            state.apply(c).unwrap();
        }
        store.commit(state, changes).unwrap();
    }

    fn journal(dir: &Path) -> Vec<u8> {
        fs::read(dir.join(JOURNAL_FILE)).unwrap()
    }

    fn record(generation: u64, changes: &[Change]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_record(&mut buf, generation, changes);
        buf
    }

    /// A journal of three records (generations 1, 2, 3) written by the store; returns the
    /// offsets of the records and the final state.
    fn three_records(dir: &Path) -> (Vec<usize>, DesiredState) {
        let (mut store, mut st) = Store::open(dir).unwrap();
        let mut offsets = Vec::new();
        for (i, c) in [put(443, "a", 1), put(443, "b", 2), put(80, "c", 3)]
            .iter()
            .enumerate()
        {
            offsets.push(journal(dir).len());
            commit(&mut store, &mut st, std::slice::from_ref(c));
            assert_eq!(store.generation(), i as u64 + 1);
        }
        (offsets, st)
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let (mut store, mut st) = Store::open(&dir).unwrap();
        assert_eq!(st, DesiredState::default());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        commit(&mut store, &mut st, &[put(443, "node-a", 30443)]);
        store.commit(&st, &[]).unwrap(); // no-op
        drop(store);
        let (store, loaded) = Store::open(&dir).unwrap();
        assert_eq!(loaded, st);
        assert_eq!(loaded.generation, 1);
        assert_eq!(store.generation(), 1);
        let text = String::from_utf8(journal(&dir)).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn replay_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut st) = Store::open(tmp.path()).unwrap();
        for i in 0..50u16 {
            commit(
                &mut store,
                &mut st,
                &[put(443, &format!("n{i}"), 30000 + i)],
            );
        }
        commit(
            &mut store,
            &mut st,
            &[del(443, "n7"), put(8883, "n1", 1883)],
        );
        drop(store);
        let (mut store, mut loaded) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, st);
        assert_eq!(loaded.generation, 52);
        // And commits continue after the replayed records.
        commit(&mut store, &mut loaded, &[del(443, "n8")]);
        drop(store);
        let (_, again) = Store::open(tmp.path()).unwrap();
        assert_eq!(again, loaded);
        assert_eq!(again.generation, 53);
    }

    #[test]
    fn group_commit_is_one_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut st) = Store::open(tmp.path()).unwrap();
        let batch: Vec<Change> = (0..32u16)
            .map(|i| put(443 + i % 4, &format!("node-{i}"), 30000 + i))
            .collect();
        commit(&mut store, &mut st, &batch);
        // Changes without effect may ride along: the generation stays.
        commit(&mut store, &mut st, &batch[..3]);
        assert_eq!(st.generation, 32);
        assert_eq!(
            journal(tmp.path()).iter().filter(|&&b| b == b'\n').count(),
            2
        );
        drop(store);
        let (_, loaded) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, st);
        assert_eq!(loaded.server_count(), 32);
    }

    #[test]
    fn generation_never_goes_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut st) = Store::open(tmp.path()).unwrap();
        commit(&mut store, &mut st, &[put(443, "a", 1), put(443, "b", 2)]);
        let old = DesiredState {
            generation: 1,
            ..st.clone()
        };
        let e = store.commit(&old, &[put(443, "c", 3)]).unwrap_err();
        assert!(matches!(e, StoreError::GenerationWentBack { .. }), "{e}");
    }

    #[test]
    fn compaction_then_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            compact_after_records: 10,
            compact_after_bytes: 1 << 30,
        };
        let (mut store, mut st) = Store::open_with(tmp.path(), opts).unwrap();
        for i in 0..25u16 {
            commit(
                &mut store,
                &mut st,
                &[put(443, &format!("n{i}"), 30000 + i)],
            );
        }
        // Compacted at 10 and 20 records; 5 remain in the journal.
        let snap: DesiredState =
            serde_json::from_slice(&fs::read(tmp.path().join(SNAPSHOT_FILE)).unwrap()).unwrap();
        assert_eq!(snap.generation, 20);
        assert_eq!(
            String::from_utf8(journal(tmp.path()))
                .unwrap()
                .lines()
                .count(),
            5
        );
        assert!(!tmp.path().join(SNAPSHOT_TMP_FILE).exists());
        drop(store);
        let (_, loaded) = Store::open_with(tmp.path(), opts).unwrap();
        assert_eq!(loaded, st);

        // By bytes too.
        let opts = StoreOptions {
            compact_after_records: 1 << 40,
            compact_after_bytes: 1000,
        };
        let (mut store, mut st) = Store::open_with(tmp.path(), opts).unwrap();
        for i in 0..20u16 {
            commit(&mut store, &mut st, &[put(80, &format!("m{i}"), 30000 + i)]);
        }
        assert!(journal(tmp.path()).len() < 1000);
        drop(store);
        let (_, loaded) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, st);
    }

    #[test]
    fn crash_between_snapshot_and_truncation_is_safe() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut store, mut st) = Store::open(tmp.path()).unwrap();
        commit(&mut store, &mut st, &[put(443, "a", 1), put(443, "b", 2)]);
        commit(&mut store, &mut st, &[del(443, "a")]);
        // The snapshot is renamed into place but the journal not yet truncated: replaying the
        // delete again would fail, so replay must skip what the snapshot holds.
        write_snapshot(tmp.path(), &st).unwrap();
        drop(store);
        let (mut store, mut loaded) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, st);
        assert!(
            journal(tmp.path()).is_empty(),
            "open finishes the compaction"
        );
        commit(&mut store, &mut loaded, &[put(443, "c", 3)]);

        // Same with a record above the snapshot left after the covered ones.
        let covered = loaded.clone();
        commit(&mut store, &mut loaded, &[del(443, "c")]);
        drop(store);
        let mut bytes = record(covered.generation, &[put(443, "c", 3)]);
        bytes.extend(journal(tmp.path()));
        fs::write(tmp.path().join(JOURNAL_FILE), bytes).unwrap();
        write_snapshot(tmp.path(), &covered).unwrap();
        let (_, again) = Store::open(tmp.path()).unwrap();
        assert_eq!(again, loaded);
    }

    #[test]
    fn torn_tail_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, st) = three_records(tmp.path());
        let good = journal(tmp.path());
        let rec = record(4, &[put(80, "torn", 4)]);
        for cut in [1, 8, 9, rec.len() / 2, rec.len() - 1] {
            let mut bytes = good.clone();
            bytes.extend_from_slice(&rec[..cut]);
            fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
            let (mut store, mut loaded) = Store::open(tmp.path()).unwrap();
            assert_eq!(loaded, st, "cut at {cut}");
            assert_eq!(
                journal(tmp.path()),
                good,
                "truncated to the last good record"
            );
            // Appends continue cleanly after the truncation.
            commit(&mut store, &mut loaded, &[put(80, "after", 5)]);
            drop(store);
            let (_, again) = Store::open(tmp.path()).unwrap();
            assert_eq!(again, loaded);
            fs::write(tmp.path().join(JOURNAL_FILE), &good).unwrap();
        }
        // Zeros from a filesystem that extended the file but never wrote the data.
        let mut bytes = good.clone();
        bytes.extend_from_slice(&[0; 100]);
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let (_, loaded) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded, st);
        assert_eq!(journal(tmp.path()), good);
    }

    #[test]
    fn crc_mismatch_in_last_record_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let (offsets, _) = three_records(tmp.path());
        let mut bytes = journal(tmp.path());
        let last = offsets[2];
        let pos = bytes.len() - 5;
        bytes[pos] ^= 0x01;
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let (_, loaded) = Store::open(tmp.path()).unwrap();
        assert_eq!(loaded.generation, 2);
        assert!(!loaded.frontends.contains_key(&80));
        assert_eq!(journal(tmp.path()).len(), last);
    }

    #[test]
    fn corruption_mid_journal_is_an_error_naming_the_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let (offsets, _) = three_records(tmp.path());
        let original = journal(tmp.path());
        let mut bytes = original.clone();
        bytes[offsets[1] + 20] ^= 0x01;
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        match &e {
            StoreError::Corrupt {
                record,
                offset,
                path,
                reason,
            } => {
                assert_eq!(*record, 1);
                assert_eq!(*offset, offsets[1] as u64);
                assert!(path.ends_with(JOURNAL_FILE));
                assert!(reason.contains("CRC mismatch"), "{reason}");
            }
            other => panic!("{other}"),
        }
        let text = e.to_string();
        assert!(text.contains(&format!("at byte {}", offsets[1])), "{text}");
        assert_eq!(journal(tmp.path()), bytes, "nothing was dropped");

        // A lost newline merges two records: also not a torn tail.
        let mut bytes = original.clone();
        bytes[offsets[1] - 1] = b' ';
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { offset: 0, .. }), "{e}");
    }

    #[test]
    fn generation_mismatch_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let (offsets, _) = three_records(tmp.path());
        let mut bytes = journal(tmp.path());
        bytes.truncate(offsets[2]);
        bytes.extend(record(7, &[put(80, "c", 3)]));
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        match &e {
            StoreError::Corrupt { record, reason, .. } => {
                assert_eq!(*record, 2);
                assert!(reason.contains("generation 3"), "{reason}");
            }
            other => panic!("{other}"),
        }
        // Generations going backwards.
        bytes.truncate(offsets[2]);
        bytes.extend(record(1, &[put(80, "c", 3)]));
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("only grow"), "{e}");
    }

    #[test]
    fn change_that_no_longer_applies_names_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (offsets, _) = three_records(tmp.path());
        let mut bytes = journal(tmp.path());
        bytes.truncate(offsets[2]);
        bytes.extend(record(3, &[del(80, "nobody")]));
        fs::write(tmp.path().join(JOURNAL_FILE), &bytes).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("record 2 at byte {}", offsets[2])),
            "{text}"
        );
        assert!(text.contains("no frontend on port 80"), "{text}");
    }

    #[test]
    fn bad_snapshot_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(SNAPSHOT_FILE), b"{\"generation\": 3").unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        assert!(matches!(e, StoreError::Snapshot { .. }), "{e}");
    }

    #[test]
    fn second_opener_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(tmp.path()).unwrap();
        let e = Store::open(tmp.path()).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        drop(store);
        Store::open(tmp.path()).unwrap();
    }
}
