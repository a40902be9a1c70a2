//! What the daemon does with each request: the control requests of the
//! local socket (volumes, exports, snapshots, keys, scrub) here, replica
//! operations handed to [`crate::replica::handle`].

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Daemon, ProgressFn};
use crate::error::{Error, Result};
use crate::io::VolumeIo;
use crate::proto::{self, Progress, Request, Response, ScrubReport};
use crate::writer::Keys;
use crate::{replica, validate_name, MAX_IO};

impl Daemon {
    pub(super) fn dispatch(&self, req: Request, progress: ProgressFn) -> Result<Response> {
        match req {
            Request::BlockLocation { name, block } => Ok(Response::Location(
                self.engine
                    .block_location(&name, block)?
                    .map(|(p, o)| (p.display().to_string(), o)),
            )),
            Request::VolCreate {
                name,
                size,
                replicas,
                key,
            } => {
                let crypt = key.as_ref().map(|k| proto::CryptRec {
                    key_check: crate::crypt::key_check(k),
                    rekey: None,
                });
                validate_name(&name)?;
                if replicas.is_empty() || replicas.len() > 3 {
                    return Err(Error::Invalid("a volume needs 1 to 3 replicas".into()));
                }
                for (i, r) in replicas.iter().enumerate() {
                    validate_name(&r.node)?;
                    if replicas[..i].iter().any(|o| o.node == r.node) {
                        return Err(Error::Invalid(format!("replica {} given twice", r.node)));
                    }
                }
                for (i, r) in replicas.iter().enumerate() {
                    let created = self.remote(
                        r,
                        &Request::CreateReplica {
                            name: name.clone(),
                            size,
                            replicas: replicas.clone(),
                            epoch: 1,
                            crypt: crypt.clone(),
                        },
                    );
                    if let Err(e) = created {
                        // Undo the replicas already created.
                        for done in &replicas[..i] {
                            let _ = self.remote(
                                done,
                                &Request::DeleteReplica {
                                    name: name.clone(),
                                    epoch: 1,
                                },
                            );
                        }
                        return Err(Error::Unavailable(format!(
                            "cannot create the replica on {}: {e}",
                            r.node
                        )));
                    }
                }
                let w = self.attach_with_keys(
                    &name,
                    Some(replicas),
                    false,
                    Keys {
                        key,
                        next_key: None,
                    },
                )?;
                Ok(Response::Status(w.status()))
            }
            Request::VolList => {
                let mut names: Vec<String> =
                    self.engine.list().into_iter().map(|i| i.name).collect();
                for n in self.writers.lock().expect(crate::POISONED).keys() {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
                names.sort();
                Ok(Response::Volumes(
                    names.iter().filter_map(|n| self.status(n).ok()).collect(),
                ))
            }
            Request::VolShow { name } => Ok(Response::Status(self.status(&name)?)),
            Request::VolDelete { name } => {
                let w = self.writer(&name)?;
                self.unexport_vhost(&name);
                let replicas = w.replicas();
                w.detach();
                self.writers.lock().expect(crate::POISONED).remove(&name);
                let mut errors = Vec::new();
                for r in &replicas {
                    let req = Request::DeleteReplica {
                        name: name.clone(),
                        epoch: w.epoch,
                    };
                    if let Err(e) = self.remote(r, &req) {
                        errors.push(format!("{}: {e}", r.node));
                    }
                }
                if errors.is_empty() {
                    Ok(Response::Ok)
                } else {
                    Err(Error::Unavailable(format!(
                        "deleted, but not on every replica: {}",
                        errors.join("; ")
                    )))
                }
            }
            Request::VolResize { name, size } => {
                self.writer(&name)?.resize(size)?;
                // A VM using the volume learns its new capacity now.
                if let Some(e) = self.vhost_exports.lock().expect(crate::POISONED).get(&name) {
                    match e.config_changed() {
                        Ok(true) => {
                            tracing::info!(volume = %name, size, "told the vhost-user frontend of the new size")
                        }
                        Ok(false) => {}
                        Err(err) => {
                            tracing::warn!(volume = %name, error = %err, "cannot tell the vhost-user frontend of the new size")
                        }
                    }
                }
                Ok(Response::Ok)
            }
            Request::VolSnapshot { name, snap } => {
                self.writer(&name)?.snapshot(&snap)?;
                Ok(Response::Ok)
            }
            Request::VolDeleteSnapshot { name, snap } => {
                self.writer(&name)?.delete_snapshot(&snap)?;
                Ok(Response::Ok)
            }
            Request::VolClone { name, snap, new } => {
                let w = self.writer(&name)?;
                w.clone_to(&snap, &new)?;
                // A clone shares its parent's key.
                let keys = Keys {
                    key: w.key_copy()?,
                    next_key: None,
                };
                let c = self.attach_with_keys(&new, Some(w.replicas()), false, keys)?;
                Ok(Response::Status(c.status()))
            }
            Request::VolRebuild { name, add, remove } => {
                let w = self.writer(&name)?;
                w.rebuild(add.clone(), remove.as_deref())?;
                loop {
                    let st = w.status();
                    let r = st.replicas.iter().find(|r| r.node == add.node);
                    match r {
                        Some(r) if r.state == "in-sync" => break,
                        Some(r) => {
                            let total = self
                                .engine
                                .info(&name)
                                .map(|i| i.regions.len() as u64)
                                .unwrap_or(0);
                            progress(Progress {
                                done: total.saturating_sub(r.dirty_regions),
                                total,
                            });
                        }
                        None => return Err(Error::Io("new replica vanished".into())),
                    }
                    if w.is_fenced() {
                        return Err(Error::Fenced {
                            request: w.epoch,
                            current: w.epoch.saturating_add(1),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(Response::Status(w.status()))
            }
            Request::VolScrub { name } => {
                let replicas = match self.writer(&name) {
                    Ok(w) => w.replicas(),
                    Err(_) => self.engine.info(&name)?.replicas,
                };
                let mut total = ScrubReport::default();
                let n = replicas.len() as u64;
                for (k, r) in replicas.iter().enumerate() {
                    progress(Progress {
                        done: k as u64,
                        total: n,
                    });
                    match self.remote(r, &Request::ScrubReplica { name: name.clone() })? {
                        Response::Scrub(s) => {
                            total.scanned_bytes += s.scanned_bytes;
                            total.bad_blocks.extend(s.bad_blocks);
                            total.repaired += s.repaired;
                            total.unrepaired += s.unrepaired;
                        }
                        _ => return Err(Error::Protocol("unexpected reply to scrub".into())),
                    }
                }
                // Then, where this node is the writer, the replicas are
                // compared with each other.
                if let Ok(w) = self.writer(&name) {
                    let c = crate::verify::compare_replicas(&w, &mut |done, all| {
                        progress(Progress {
                            done: n + done,
                            total: n + all,
                        })
                    })?;
                    total.compared_regions = c.compared;
                    total.diverged_regions = c.diverged;
                }
                Ok(Response::Scrub(total))
            }
            Request::VolAttach {
                name,
                force,
                key,
                next_key,
            } => Ok(Response::Status(
                self.attach_with_keys(&name, None, force, Keys { key, next_key })?
                    .status(),
            )),
            Request::VolRekey { name, key } => {
                let w = self.writer(&name)?;
                w.begin_rekey(key)?;
                w.spawn_rekey()?;
                loop {
                    let st = w.status();
                    let Some(r) = st.rekey else { break };
                    progress(Progress {
                        done: r.done,
                        total: r.total,
                    });
                    if w.is_fenced() || w.is_detached() {
                        return Err(Error::Unavailable(format!(
                            "{name} stopped being attached here during the rekey; attach it \
                             again with both keys to resume"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(Response::Status(w.status()))
            }
            Request::VolDetach { name } => {
                self.detach(&name);
                Ok(Response::Ok)
            }
            Request::VolRead { name, offset, len } => {
                if len > MAX_IO {
                    return Err(Error::Invalid(format!(
                        "read of {len} bytes exceeds {MAX_IO}"
                    )));
                }
                let w = self.writer(&name)?;
                let mut buf = vec![0u8; len as usize];
                w.read_at(&mut buf, offset)?;
                Ok(Response::Read(crate::types::ReadOut {
                    data: buf.into(),
                    bad_blocks: Vec::new(),
                }))
            }
            Request::VolWrite { name, offset, data } => {
                self.writer(&name)?.write_at(&data, offset)?;
                Ok(Response::Ok)
            }
            Request::VolDiscard { name, offset, len } => {
                self.writer(&name)?.discard(offset, len)?;
                Ok(Response::Ok)
            }
            Request::VolFlush { name } => {
                self.writer(&name)?.flush()?;
                Ok(Response::Ok)
            }
            Request::VolExportVhost { name, socket } => {
                self.export_vhost(&name, Path::new(&socket))?;
                Ok(Response::Ok)
            }
            Request::VolAttachExport {
                name,
                force,
                key,
                next_key,
                socket,
                queues,
                read_only,
            } => {
                let opts = crate::vhost_blk::ExportOptions { queues, read_only };
                let keys = Keys { key, next_key };
                let w = self.attach_and_export(&name, force, keys, Path::new(&socket), opts)?;
                Ok(Response::Status(w.status()))
            }
            Request::VolExport {
                name,
                socket,
                queues,
                read_only,
            } => {
                let opts = crate::vhost_blk::ExportOptions { queues, read_only };
                self.export_vhost_with(&name, Path::new(&socket), opts)?;
                Ok(Response::Ok)
            }
            Request::ScrubReplica { name } => {
                self.engine.check_healthy()?;
                let mut last = Instant::now();
                let r = replica::scrub_and_repair(
                    &self.engine,
                    self.connector.as_ref(),
                    &name,
                    &mut |done, total| {
                        if last.elapsed() > Duration::from_millis(200) {
                            last = Instant::now();
                            progress(Progress { done, total });
                        }
                    },
                )?;
                Ok(Response::Scrub(r))
            }
            other => replica::handle(&self.engine, self.connector.as_ref(), &other).into_result(),
        }
    }
}
