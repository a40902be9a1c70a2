//! Image import: each file is copied into `images/tmp`, hashed on the way,
//! and renamed to `images/sha256/<digest>`; a blob that is already there is
//! kept and the copy dropped (deduplication). Progress is the image's
//! observed state; the import runs off the async threads.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::db::{Change, Db, Note};
use crate::model::{FileRole, Image, ImageFile, ImageSource, ImageState, Vm};
use crate::paths::Paths;

/// The files an image source names, with their roles.
pub fn source_files(s: &ImageSource) -> Vec<(FileRole, &str)> {
    match s {
        ImageSource::Kernel { kernel, initrd, .. } => {
            let mut v = vec![(FileRole::Kernel, kernel.as_str())];
            if let Some(i) = initrd {
                v.push((FileRole::Initrd, i.as_str()));
            }
            v
        }
        ImageSource::Disk { path } => vec![(FileRole::Disk, path.as_str())],
        ImageSource::Upload { .. } => Vec::new(),
    }
}

/// Moves a fully written, synced temporary file to its blob, or drops it
/// when the blob is there already (deduplication).
fn commit_blob(paths: &Paths, tmp: &Path, digest: &str) -> Result<()> {
    let blob = paths.image_blob(digest);
    if blob.exists() {
        std::fs::remove_file(tmp)?;
    } else {
        std::fs::rename(tmp, &blob)?;
    }
    Ok(())
}

/// Copies `src` into the blob store, reporting bytes as they go.
fn import_file(paths: &Paths, src: &Path, mut progress: impl FnMut(u64)) -> Result<(String, u64)> {
    std::fs::create_dir_all(paths.image_tmp())?;
    std::fs::create_dir_all(paths.image_blobs())?;
    let tmp = paths.image_tmp().join(uuid::Uuid::new_v4().to_string());
    let result = (|| -> Result<(String, u64)> {
        let mut input =
            std::fs::File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
        // Blobs are readable by root only: images may hold secrets.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = input
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", src.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            total += n as u64;
            progress(n as u64);
        }
        out.sync_all()?;
        let digest = hex::encode(hasher.finalize());
        commit_blob(paths, &tmp, &digest)?;
        Ok((digest, total))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Imports every file of image `id`, then marks it ready (or failed, with
/// the reason). Blocking: run it with `spawn_blocking`.
pub fn run_import(db: Arc<Db>, paths: Paths, id: String) {
    let image: Image = match db.get(&id) {
        Ok(i) => i,
        Err(_) => return, // deleted meanwhile
    };
    if matches!(image.spec.source, ImageSource::Upload { .. }) {
        return; // its files come over the API
    }
    let mut files = Vec::new();
    let mut done = 0u64;
    let mut last = Instant::now();
    let mut outcome: Result<()> = Ok(());
    for (role, src) in source_files(&image.spec.source) {
        let r = import_file(&paths, Path::new(src), |n| {
            done += n;
            if last.elapsed() > Duration::from_millis(500) {
                last = Instant::now();
                let _ = db.update(&id, Change::Observed, |i: &mut Image| {
                    i.status.bytes_done = done;
                    Ok(None)
                });
            }
        });
        match r {
            Ok((sha256, size)) => files.push(ImageFile { role, sha256, size }),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let r = db.update(&id, Change::Observed, |i: &mut Image| {
        match &outcome {
            Ok(()) => {
                i.status.state = ImageState::Ready;
                i.status.bytes_done = done;
                i.status.files = files.clone();
                i.status.reason = None;
            }
            Err(e) => {
                i.status.state = ImageState::Failed;
                i.status.reason = Some(format!("{e:#}"));
            }
        }
        Ok(Some(Note::new("state")))
    });
    if r.is_err() {
        // The image was deleted during the import.
        collect_garbage(&db, &paths);
    }
}

/// A file arriving over the network, hashed as it is written to
/// `images/tmp`; [`BlobWriter::finish`] makes it a blob. Dropped unfinished,
/// it removes its temporary file.
pub struct BlobWriter {
    paths: Paths,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    pub written: u64,
}

impl BlobWriter {
    pub async fn new(paths: &Paths) -> Result<BlobWriter> {
        tokio::fs::create_dir_all(paths.image_tmp()).await?;
        tokio::fs::create_dir_all(paths.image_blobs()).await?;
        let tmp = paths.image_tmp().join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(BlobWriter {
            paths: paths.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let file = self.file.as_mut().context("the upload is finished")?;
        file.write_all(data)
            .await
            .context("cannot write the upload")?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// The SHA-256 (hex) of what was written.
    pub fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Syncs the file and makes it the blob of its digest.
    pub async fn finish(mut self) -> Result<()> {
        let file = self.file.take().context("the upload is finished")?;
        file.sync_all().await.context("cannot sync the upload")?;
        drop(file);
        let (paths, tmp, d) = (self.paths.clone(), self.tmp.clone(), self.digest());
        tokio::task::spawn_blocking(move || commit_blob(&paths, &tmp, &d)).await??;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The files being received now, so that one file has one upload at a time.
static RECEIVING: Mutex<Option<HashSet<(String, FileRole)>>> = Mutex::new(None);

pub struct Receiving((String, FileRole));

impl Receiving {
    /// Whether any upload is being received.
    fn any() -> bool {
        RECEIVING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| !s.is_empty())
    }

    pub fn take(id: &str, role: FileRole) -> Option<Receiving> {
        let key = (id.to_string(), role);
        let mut set = RECEIVING.lock().unwrap_or_else(|e| e.into_inner());
        set.get_or_insert_with(HashSet::new)
            .insert(key.clone())
            .then_some(Receiving(key))
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut set = RECEIVING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = set.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// Total size of an image source's files, for progress.
pub fn source_size(s: &ImageSource) -> u64 {
    if let ImageSource::Upload { files, .. } = s {
        return files.iter().map(|f| f.size).sum();
    }
    source_files(s)
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Whether any VM boots from this image.
pub fn used_by(db: &Db, image: &Image) -> Result<Option<String>, crate::db::DbError> {
    Ok(db
        .list::<Vm>()?
        .into_iter()
        .find(|v| v.spec.boot.image == image.meta.id || v.spec.boot.image == image.meta.name)
        .map(|v| v.meta.name))
}

/// Removes blobs no image refers to.
pub fn collect_garbage(db: &Db, paths: &Paths) {
    let Ok(images) = db.list::<Image>() else {
        return;
    };
    let live: std::collections::HashSet<String> = images
        .iter()
        .flat_map(|i| i.status.files.iter().map(|f| f.sha256.clone()))
        .collect();
    // An import in progress may be about to refer to any blob; an upload
    // waiting for its files refers to none yet.
    let importing = Receiving::any()
        || images.iter().any(|i| {
            i.status.state == ImageState::Importing
                && !matches!(i.spec.source, ImageSource::Upload { .. })
        });
    let Ok(rd) = std::fs::read_dir(paths.image_blobs()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !importing && !live.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The blob of a file of a ready image.
pub fn blob(paths: &Paths, image: &Image, role: FileRole) -> Option<PathBuf> {
    image.file(role).map(|f| paths.image_blob(&f.sha256))
}
