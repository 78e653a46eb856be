//! Re-reads the `--objects` paths when they change and publishes each new whole set.
//!
//! A poll of every file's identity and times, not inotify: a ConfigMap volume changes by swapping
//! a `..data` symlink, which an inotify watch on the old target never reports; directories come
//! and go under a recursive watch; and a poll needs no extra crate. Stat-ing the files every
//! 300 ms costs microseconds for the handful of files `--objects` is meant for, and a change is
//! seen within one interval (the SPEC asks for 1 s). Only the files whose stamp changed are
//! parsed again, so one edit in a large tree stays quick.
//!
//! A file rewritten in place (`>` in a shell, most editors) is empty or half written for a
//! moment, and a poll landing in that moment must not publish it: every Service it held would
//! vanish from the proxies until the next poll. So a file that changed in place within
//! [`SETTLING`] of a poll, or while it was read, keeps its previous content for one more poll; it
//! is read then if it has not changed again. A file replaced whole (renamed over, a ConfigMap's
//! symlink swap) is read at once. A change is published within two intervals at most.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::objects::{self, ObjectSet, Problem};

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// A file modified less than this long before a poll may still be being written.
pub const SETTLING: Duration = Duration::from_millis(100);

/// One reading of the paths: what they hold and what had to be skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub objects: ObjectSet,
    pub problems: Vec<Problem>,
}

/// What identifies a file's content without reading it: a rewrite changes the size or times,
/// a replacement (rename over, symlink swap) the inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileStamp {
    path: PathBuf,
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileStamp {
    /// Whether the file was written so shortly before `now` that the writer may not be done.
    /// A modification time ahead of `now` (a skewed clock) counts as recent too.
    fn is_recent(&self, now: SystemTime) -> bool {
        let (seconds, nanos) = self.modified;
        let Ok(seconds) = u64::try_from(seconds) else {
            return false;
        };
        let modified =
            SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos.clamp(0, 999_999_999) as u32);
        now.duration_since(modified)
            .map_or(true, |age| age < SETTLING)
    }
}

fn stamp(path: PathBuf) -> Option<FileStamp> {
    // Gone since it was listed: it is not there to read either.
    let metadata = std::fs::metadata(&path).ok()?;
    Some(FileStamp {
        device: metadata.dev(),
        inode: metadata.ino(),
        size: metadata.size(),
        modified: (metadata.mtime(), metadata.mtime_nsec()),
        changed: (metadata.ctime(), metadata.ctime_nsec()),
        path,
    })
}

/// What one file held when it had a given stamp.
type FileRead = Arc<(ObjectSet, Vec<Problem>)>;

/// Reads the paths again when they change, re-reading only the files whose stamps changed.
struct Reader {
    paths: Vec<PathBuf>,
    /// The stamps of the last round; `None` before the first.
    stamps: Option<Vec<FileStamp>>,
    files: HashMap<PathBuf, (FileStamp, FileRead)>,
    /// Files found changed too recently to read, as last seen: read at the next poll that
    /// finds them so again.
    settling: HashSet<FileStamp>,
    /// Files parsed so far, for the log (and the test that only changed files are).
    files_read: usize,
}

impl Reader {
    fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            stamps: None,
            files: HashMap::new(),
            settling: HashSet::new(),
            files_read: 0,
        }
    }

    /// The whole set again if any file changed, appeared or went away since the last call,
    /// `now` being the time of the poll.
    fn refresh(&mut self, now: SystemTime) -> Option<Snapshot> {
        let mut problems = Vec::new();
        let listed = objects::files(&self.paths, &mut problems);
        // Stamps before the read: a write landing during the read changes them again, so it
        // is read on the next round rather than lost.
        let stamps: Vec<FileStamp> = listed.into_iter().filter_map(stamp).collect();
        if self.stamps.as_ref() == Some(&stamps) && self.settling.is_empty() {
            return None;
        }
        for problem in &problems {
            tracing::warn!(%problem, "objects: skipped");
        }
        // The first reading has nothing older to keep: it does not wait for recent files.
        let first = self.stamps.is_none();
        let waited = std::mem::take(&mut self.settling);
        let mut files = HashMap::with_capacity(stamps.len());
        let mut objects = ObjectSet::default();
        let mut read_now = 0;
        for stamp in &stamps {
            let kept = match self.files.remove(&stamp.path) {
                Some((before, read)) if before == *stamp => Some((before, read)),
                previous => {
                    // A new inode at the path is a whole file renamed over the old one (or a
                    // ConfigMap's symlink swapped): complete however recent.
                    let replaced = previous.as_ref().is_some_and(|(before, _)| {
                        (before.device, before.inode) != (stamp.device, stamp.inode)
                    });
                    let settled =
                        first || replaced || waited.contains(stamp) || !stamp.is_recent(now);
                    let read = settled.then(|| objects::read_file(&stamp.path));
                    match read {
                        // Unchanged while it was read: it is what the file holds.
                        Some(read) if self::stamp(stamp.path.clone()).as_ref() == Some(stamp) => {
                            for problem in &read.1 {
                                tracing::warn!(%problem, "objects: skipped");
                            }
                            read_now += 1;
                            Some((stamp.clone(), Arc::new(read)))
                        }
                        // Written just now or during the read: what it held before, under
                        // its old stamp so that the next poll looks again.
                        _ => {
                            tracing::debug!(
                                path = %stamp.path.display(),
                                "objects: changed just now; read at the next poll"
                            );
                            if !settled {
                                self.settling.insert(stamp.clone());
                            }
                            previous
                        }
                    }
                }
            };
            if let Some((kept_stamp, read)) = kept {
                objects.append(&read.0);
                problems.extend(read.1.iter().cloned());
                files.insert(stamp.path.clone(), (kept_stamp, read));
            }
        }
        self.files = files;
        self.stamps = Some(stamps);
        self.files_read += read_now;
        let counts = objects.counts();
        tracing::info!(
            ?counts,
            problems = problems.len(),
            files = self.files.len(),
            read_now,
            "objects: read"
        );
        Some(Snapshot { objects, problems })
    }
}

/// Reads `paths` now, then every `interval` re-reads the files that changed, appeared or went
/// away, and publishes the new whole set when it differs. The poll stops when every receiver
/// is gone. Must be called inside a tokio runtime.
pub fn watch_objects(paths: Vec<PathBuf>, interval: Duration) -> watch::Receiver<Arc<Snapshot>> {
    let mut reader = Reader::new(paths);
    let first = reader.refresh(SystemTime::now()).unwrap_or_default();
    let (sender, receiver) = watch::channel(Arc::new(first));
    let reader = Arc::new(Mutex::new(reader));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = sender.closed() => return,
            }
            let reader = Arc::clone(&reader);
            // File system calls block: keep them off the runtime's workers. Rounds never
            // overlap (each is awaited), so the lock is never contended.
            let round = tokio::task::spawn_blocking(move || {
                reader
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .refresh(SystemTime::now())
            })
            .await;
            match round {
                Ok(Some(snapshot)) => {
                    sender.send_if_modified(|current| {
                        let differs = **current != snapshot;
                        if differs {
                            *current = Arc::new(snapshot);
                        }
                        differs
                    });
                }
                Ok(None) => {}
                Err(err) => tracing::error!(%err, "objects: the re-read failed; trying again"),
            }
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;
    use std::time::Instant;

    const INTERVAL: Duration = Duration::from_millis(50);
    /// Far above one interval, and under the SPEC's 1 s.
    const DEADLINE: Duration = Duration::from_secs(1);

    fn service(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}]}}\n")
    }

    fn names(snapshot: &Snapshot) -> Vec<String> {
        let mut names: Vec<String> = snapshot
            .objects
            .services
            .iter()
            .filter_map(|service| service.metadata.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Waits (at most `DEADLINE`) until the published set holds exactly `expected` Services,
    /// and says how long that took.
    async fn until_names(
        receiver: &mut watch::Receiver<Arc<Snapshot>>,
        expected: &[&str],
    ) -> Duration {
        let start = Instant::now();
        let result = tokio::time::timeout(DEADLINE, async {
            loop {
                if names(&receiver.borrow_and_update()) == expected {
                    return;
                }
                receiver.changed().await.unwrap();
            }
        })
        .await;
        let seen = names(&receiver.borrow());
        assert!(
            result.is_ok(),
            "expected {expected:?} within {DEADLINE:?}, have {seen:?}"
        );
        start.elapsed()
    }

    fn write_atomically(path: &Path, text: &str) {
        let temporary = path.with_extension("tmp");
        fs::write(&temporary, text).unwrap();
        fs::rename(&temporary, path).unwrap();
    }

    #[tokio::test]
    async fn files_added_changed_and_removed_are_published() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("sub/b.yml");
        fs::write(&a, service("one")).unwrap();
        let mut receiver = watch_objects(vec![dir.path().to_path_buf()], INTERVAL);
        until_names(&mut receiver, &["one"]).await;

        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(&b, service("two")).unwrap();
        until_names(&mut receiver, &["one", "two"]).await;

        // Rewritten in place, a different length.
        fs::write(&a, service("three-ish")).unwrap();
        until_names(&mut receiver, &["three-ish", "two"]).await;

        // Replaced by rename, the same length.
        write_atomically(&a, &service("four-ish!"));
        until_names(&mut receiver, &["four-ish!", "two"]).await;

        fs::remove_file(&b).unwrap();
        until_names(&mut receiver, &["four-ish!"]).await;

        // A broken document is published as a problem beside the objects still read.
        fs::write(&a, service("five") + "---\nkind: [\n").unwrap();
        until_names(&mut receiver, &["five"]).await;
        assert_eq!(receiver.borrow().problems.len(), 1);
    }

    /// A poll long after every write of the test: nothing is recent.
    fn settled() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    /// A poll right after the file's last write.
    fn just_after(path: &Path) -> SystemTime {
        fs::metadata(path).unwrap().modified().unwrap() + Duration::from_millis(1)
    }

    #[test]
    fn only_the_files_that_changed_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        fs::write(&a, service("one")).unwrap();
        fs::write(&b, service("two")).unwrap();
        let mut reader = Reader::new(vec![dir.path().to_path_buf()]);
        let first = reader.refresh(settled()).unwrap();
        assert_eq!(
            (names(&first), reader.files_read),
            (vec!["one".into(), "two".into()], 2)
        );
        assert_eq!(reader.refresh(settled()), None, "nothing changed");
        fs::write(&b, service("three")).unwrap();
        let second = reader.refresh(settled()).unwrap();
        assert_eq!(
            (names(&second), reader.files_read),
            (vec!["one".into(), "three".into()], 3)
        );
        fs::remove_file(&a).unwrap();
        let third = reader.refresh(settled()).unwrap();
        assert_eq!(
            (names(&third), reader.files_read),
            (vec!["three".into()], 3)
        );
    }

    #[test]
    fn a_file_being_rewritten_in_place_keeps_its_objects_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("objects.yaml");
        fs::write(&file, service("one")).unwrap();
        let mut reader = Reader::new(vec![file.clone()]);
        // The first reading takes the file as it is, however new.
        let first = reader.refresh(just_after(&file)).unwrap();
        assert_eq!(names(&first), ["one"]);

        // Truncated, as `>` does before the writer fills it: not read yet.
        fs::File::create(&file).unwrap();
        let now = just_after(&file);
        assert_eq!(names(&reader.refresh(now).unwrap()), ["one"]);
        // Filled before the next poll, which finds it changed again, and recent: still waits.
        fs::write(&file, service("two")).unwrap();
        let now = just_after(&file);
        assert_eq!(names(&reader.refresh(now).unwrap()), ["one"]);
        assert_eq!(reader.files_read, 1, "the half-written file was never read");
        // Unchanged at the poll after: read, however recent it still looks.
        assert_eq!(names(&reader.refresh(now).unwrap()), ["two"]);
        assert_eq!(reader.refresh(now), None, "nothing changed");
        assert_eq!(reader.files_read, 2);

        // A new file written just now waits one poll too, then comes.
        let other = dir.path().join("more.yaml");
        let mut reader = Reader::new(vec![dir.path().to_path_buf()]);
        reader.refresh(settled()).unwrap();
        fs::write(&other, service("three")).unwrap();
        let now = just_after(&other);
        assert_eq!(names(&reader.refresh(now).unwrap()), ["two"]);
        assert_eq!(names(&reader.refresh(now).unwrap()), ["three", "two"]);

        // Written long before the poll (a copy keeping its times): read at once.
        fs::write(&other, service("four")).unwrap();
        assert_eq!(names(&reader.refresh(settled()).unwrap()), ["four", "two"]);
        // Replaced whole by a rename, however recently: read at once.
        write_atomically(&other, &service("five"));
        let now = just_after(&other);
        assert_eq!(names(&reader.refresh(now).unwrap()), ["five", "two"]);
    }

    #[tokio::test]
    async fn a_file_named_directly_and_removed_takes_its_objects_and_may_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("objects.yaml");
        fs::write(&file, service("one")).unwrap();
        let mut receiver = watch_objects(vec![file.clone()], INTERVAL);
        until_names(&mut receiver, &["one"]).await;
        fs::remove_file(&file).unwrap();
        until_names(&mut receiver, &[]).await;
        assert_eq!(
            receiver.borrow().problems.len(),
            1,
            "the missing path is named"
        );
        fs::write(&file, service("again")).unwrap();
        until_names(&mut receiver, &["again"]).await;
    }

    #[tokio::test]
    async fn a_replacement_with_the_same_size_and_mtime_is_seen() {
        // As `cp -p`, `rsync -t` or `tar x` leave it: only the inode and ctime tell.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("objects.yaml");
        fs::write(&file, service("one")).unwrap();
        let modified = fs::metadata(&file).unwrap().modified().unwrap();
        let mut receiver = watch_objects(vec![dir.path().to_path_buf()], INTERVAL);
        until_names(&mut receiver, &["one"]).await;
        let replacement = dir.path().join(".objects.yaml.new");
        fs::write(&replacement, service("two")).unwrap();
        fs::File::options()
            .write(true)
            .open(&replacement)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        fs::rename(&replacement, &file).unwrap();
        until_names(&mut receiver, &["two"]).await;
    }

    #[tokio::test]
    async fn a_config_map_symlink_swap_is_seen() {
        // The layout kubelet writes for a ConfigMap volume: keys are symlinks through `..data`,
        // which is swapped to a new timestamped directory on update.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("..v1")).unwrap();
        fs::write(root.join("..v1/objects.yaml"), service("one")).unwrap();
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/objects.yaml", root.join("objects.yaml")).unwrap();
        let mut receiver = watch_objects(vec![root.to_path_buf()], INTERVAL);
        until_names(&mut receiver, &["one"]).await;

        fs::create_dir(root.join("..v2")).unwrap();
        fs::write(root.join("..v2/objects.yaml"), service("two")).unwrap();
        std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        fs::remove_dir_all(root.join("..v1")).unwrap();
        until_names(&mut receiver, &["two"]).await;
    }

    #[tokio::test]
    async fn an_unchanged_tree_publishes_nothing_new() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), service("one")).unwrap();
        let mut receiver = watch_objects(vec![dir.path().to_path_buf()], INTERVAL);
        receiver.borrow_and_update();
        // A touch without a change in content: re-read, equal, not published.
        fs::write(dir.path().join("a.yaml"), service("one")).unwrap();
        let changed = tokio::time::timeout(INTERVAL * 6, receiver.changed()).await;
        assert!(changed.is_err(), "an identical set was published again");
    }
}
