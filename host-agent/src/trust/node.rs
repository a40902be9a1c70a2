//! [`Trust`]: the node's TPM, its KEK and its measurements, as the running
//! agent holds them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::files::{self, IdentityFile, KekFile};
use super::measure::{self, EventLog, Measured};
use super::sealing::Unsealed;
use super::secret::Secret;
use super::wrap::{self, Wrapped};
use super::{format_recovery_key, parse_recovery_key, QUOTE_PCRS, SEAL_PCRS};
use crate::attest::{
    EventLogs, Evidence, EvidenceNode, KilnEvent, TpmEvidence, KILN_SOFTWARE_PCR,
    MEASUREMENT_MODE_IMA, MEASUREMENT_MODE_KILN_SELF, VM_LAUNCH_PCR,
};
use crate::model::now;
use crate::paths::Paths;
use crate::tpm::{Tpm, TpmError};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The KEK is not available: encrypted volumes stay locked.
    #[error("encrypted volumes are locked: {0}")]
    Locked(String),
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Failed(String),
}

impl From<anyhow::Error> for TrustError {
    fn from(e: anyhow::Error) -> Self {
        TrustError::Failed(format!("{e:#}"))
    }
}

impl From<TpmError> for TrustError {
    fn from(e: TpmError) -> Self {
        TrustError::Failed(format!("TPM: {e}"))
    }
}

/// What `GET /v1/node/trust` shows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct TrustStatus {
    /// False: the node was initialized with `--insecure-no-tpm`: its KEK is
    /// on disk in the clear and it cannot attest.
    pub tpm: bool,
    pub insecure_no_tpm: bool,
    /// `ima`, or `kiln-self (weaker ...)` when IMA is missing.
    pub measurement_mode: String,
    /// Whether encrypted volumes are locked (the KEK did not unseal).
    pub locked: bool,
    /// Why they are locked: which PCR and which file changed.
    #[serde(default)]
    pub reason: Option<String>,
    /// The KEK's fingerprint.
    pub kek_id: String,
    pub seal_pcrs: Vec<u8>,
    #[serde(default)]
    pub ak_public_pem: Option<String>,
    #[serde(default)]
    pub ek_public_pem: Option<String>,
}

/// What `init` shows once.
pub struct InitTrust {
    pub recovery_key: String,
    pub insecure_no_tpm: bool,
}

/// Kiln's software, as both `init` and `serve` measure it.
#[derive(Clone, Debug)]
pub struct Software {
    pub programs: Vec<PathBuf>,
    pub config: Vec<PathBuf>,
}

impl Software {
    pub fn of(paths: &Paths, vmm: &Path, store: &Path) -> Software {
        let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kiln-agent"));
        Software {
            programs: vec![me, vmm.to_path_buf(), store.to_path_buf()],
            config: vec![paths.ca_cert(), paths.node_cert()],
        }
    }
    fn measure(&self) -> Result<Vec<Measured>> {
        measure::software(&self.programs, &self.config).context("cannot measure Kiln's files")
    }
}

/// Wraps again, under the new KEK, a key wrapped by the old one for a
/// purpose.
pub type Rewrap<'a> = dyn Fn(&Wrapped, &str) -> Result<Wrapped, TrustError> + 'a;

struct State {
    kek: Option<Secret<32>>,
    reason: Option<String>,
    log: EventLog,
    kek_file: KekFile,
}

pub struct Trust {
    dir: PathBuf,
    log_path: PathBuf,
    tcti: String,
    tpm: Option<Tpm>,
    identity: IdentityFile,
    software: Software,
    state: Mutex<State>,
}

fn identity_path(dir: &Path) -> PathBuf {
    dir.join("identity.json")
}
fn kek_path(dir: &Path) -> PathBuf {
    dir.join("kek.json")
}
fn log_path(paths: &Paths) -> PathBuf {
    paths.run.join("trust").join("kiln-events.jsonl")
}

fn purpose_recovery() -> &'static str {
    "kiln node kek (recovery)"
}

fn open_tpm(tcti: &str) -> Result<Tpm> {
    Tpm::open(Some(tcti)).map_err(|e| {
        anyhow::anyhow!(
            "no usable TPM at {tcti:?}: {e} (give --tpm TCTI, or --insecure-no-tpm to run without one: no attestation, KEK on disk)"
        )
    })
}

/// Extends what is pending of Kiln's software into its PCR, logging first.
fn measure_software(tpm: Option<&Tpm>, log: &mut EventLog, files: &[Measured]) -> Result<()> {
    for e in log.pending_software(files) {
        let digest: [u8; 32] = e.event.digest();
        log.append(e).context("cannot write Kiln's event log")?;
        if let Some(tpm) = tpm {
            tpm.pcr_extend(KILN_SOFTWARE_PCR, &digest)?;
        }
    }
    Ok(())
}

fn read_pcrs(tpm: Option<&Tpm>, pcrs: &[u8]) -> Result<BTreeMap<u8, [u8; 32]>> {
    match tpm {
        Some(t) => Ok(t.pcr_read(pcrs)?),
        None => Ok(pcrs.iter().map(|p| (*p, [0u8; 32])).collect()),
    }
}

/// The policy branches a KEK is sealed to: the PCRs as they are now, and
/// as the next boot will make them (same firmware, Kiln's files measured
/// once each, in order).
fn seal_branches(now: &BTreeMap<u8, [u8; 32]>, files: &[Measured]) -> Vec<BTreeMap<u8, [u8; 32]>> {
    let mut boot = now.clone();
    boot.insert(KILN_SOFTWARE_PCR, measure::predicted_boot_value(files));
    if &boot == now {
        vec![boot]
    } else {
        vec![now.clone(), boot]
    }
}

/// Seals the KEK (in a child process: see `sealing`).
fn seal(tpm: &Tpm, kek: &Secret<32>, files: &[Measured]) -> Result<crate::tpm::SealedBlob> {
    let now = tpm.pcr_read(&SEAL_PCRS)?;
    let branches = seal_branches(&now, files);
    let exe = std::env::current_exe().context("cannot find kiln-agent itself")?;
    tpm.released(|| super::sealing::seal_in_child(&exe, tpm.tcti(), kek, &SEAL_PCRS, &branches))?
        .map_err(|e| anyhow::anyhow!("cannot seal the KEK: {e}"))
}

impl Trust {
    /// `kiln-agent init`: the TPM identity, a new KEK sealed to this
    /// node's measurements, and a recovery key to show once. Without a
    /// TPM only with `insecure`. Writes nothing on failure.
    pub fn init(
        paths: &Paths,
        tcti: Option<&str>,
        insecure: bool,
        software: &Software,
    ) -> Result<InitTrust> {
        let dir = files::dir(&paths.agent_dir());
        if kek_path(&dir).exists() {
            bail!(
                "{} exists: this node's keys are already made",
                kek_path(&dir).display()
            );
        }
        let tpm = if insecure {
            None
        } else {
            Some(open_tpm(tcti.unwrap_or(super::DEFAULT_TCTI))?)
        };
        let identity = match &tpm {
            Some(t) => {
                let id = t.create_identity()?;
                IdentityFile {
                    tpm: true,
                    ek_public_pem: Some(id.ek_public_pem),
                    ek_cert: id.ek_cert_der.map(hex::encode),
                    ak: Some(id.ak),
                    ak_public_pem: Some(id.ak_public_pem),
                    created_at: now(),
                }
            }
            None => IdentityFile {
                tpm: false,
                ek_public_pem: None,
                ek_cert: None,
                ak: None,
                ak_public_pem: None,
                created_at: now(),
            },
        };
        let files_now = software.measure()?;
        let pcrs = read_pcrs(tpm.as_ref(), &[KILN_SOFTWARE_PCR, VM_LAUNCH_PCR])?;
        let mut log = EventLog::load(&log_path(paths), &pcrs);
        measure_software(tpm.as_ref(), &mut log, &files_now)?;
        let kek = Secret::<32>::random();
        let recovery = Secret::<32>::random();
        let sealed = match &tpm {
            Some(t) => Some(seal(t, &kek, &files_now)?),
            None => None,
        };
        let kek_file = KekFile {
            id: wrap::fingerprint(kek.expose()),
            sealed,
            sealed_files: files_now,
            recovery: wrap::wrap(&recovery, kek.expose(), purpose_recovery()),
            insecure_plain: insecure.then(|| hex::encode(kek.expose())),
            updated_at: now(),
        };
        files::write(&identity_path(&dir), &identity)?;
        if let Err(e) = files::write(&kek_path(&dir), &kek_file) {
            let _ = std::fs::remove_file(identity_path(&dir));
            return Err(e);
        }
        Ok(InitTrust {
            recovery_key: format_recovery_key(recovery.expose()),
            insecure_no_tpm: insecure,
        })
    }

    /// `kiln-agent serve`: opens the TPM, measures Kiln's software, and
    /// unseals the KEK, or stays locked and says why.
    pub fn open(paths: &Paths, tcti: Option<&str>, software: Software) -> Result<Trust> {
        let dir = files::dir(&paths.agent_dir());
        let identity: IdentityFile = files::read(&identity_path(&dir))
            .context("this node has no keys (made by `kiln-agent init`)")?;
        let kek_file: KekFile = files::read(&kek_path(&dir))?;
        let tcti = tcti.unwrap_or(super::DEFAULT_TCTI).to_string();
        let mut tpm = if identity.tpm {
            Some(open_tpm(&tcti)?)
        } else {
            tracing::warn!(
                "this node runs with --insecure-no-tpm: its KEK is on disk, it cannot attest"
            );
            None
        };
        let files_now = software.measure()?;
        let pcrs = read_pcrs(tpm.as_ref(), &[KILN_SOFTWARE_PCR, VM_LAUNCH_PCR])?;
        let mut log = EventLog::load(&log_path(paths), &pcrs);
        measure_software(tpm.as_ref(), &mut log, &files_now)?;
        // The KEK is unsealed by a child process, which needs the TPM to
        // itself (a swtpm serves one connection); the agent's own
        // connection opens again after.
        let unsealed = match (&tpm, &kek_file.sealed) {
            (Some(_), Some(blob)) => {
                drop(tpm.take());
                let exe = std::env::current_exe().context("cannot find kiln-agent itself")?;
                let u = super::sealing::in_child(&exe, &tcti, blob);
                tpm = Some(open_tpm(&tcti)?);
                Some(u)
            }
            _ => None,
        };
        let (kek, reason) = match (&tpm, &kek_file.insecure_plain, &kek_file.sealed) {
            (None, Some(plain), _) => {
                let mut b = hex::decode(plain).unwrap_or_default();
                match Secret::<32>::take(&mut b) {
                    Some(k) => (Some(k), None),
                    None => (None, Some("the stored KEK is malformed".to_string())),
                }
            }
            (Some(t), _, Some(blob)) => match unsealed {
                Some(Unsealed::Key(k)) if wrap::fingerprint(k.expose()) == kek_file.id => {
                    (Some(k), None)
                }
                Some(Unsealed::Key(_)) => (
                    None,
                    Some("the unsealed KEK is not this node's".to_string()),
                ),
                Some(Unsealed::PolicyMismatch) => (
                    None,
                    Some(why_locked(t, blob, &kek_file.sealed_files, &files_now)),
                ),
                Some(Unsealed::Failed(e)) => {
                    (None, Some(format!("the TPM did not unseal the KEK: {e}")))
                }
                None => (None, Some("the KEK was not unsealed".to_string())),
            },
            _ => (
                None,
                Some("this node's KEK record is incomplete".to_string()),
            ),
        };
        if let Some(r) = &reason {
            tracing::warn!("encrypted volumes are locked: {r}");
        }
        Ok(Trust {
            dir,
            log_path: log_path(paths),
            tcti,
            tpm,
            identity,
            software,
            state: Mutex::new(State {
                kek,
                reason,
                log,
                kek_file,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insecure(&self) -> bool {
        self.tpm.is_none()
    }

    fn kernel_tpm(&self) -> bool {
        self.tcti.starts_with("device")
    }

    fn read_kernel_log(&self, path: &str) -> Option<String> {
        if !self.kernel_tpm() {
            return None;
        }
        std::fs::read(path)
            .ok()
            .filter(|b| !b.is_empty())
            .map(hex::encode)
    }

    pub fn measurement_mode(&self) -> &'static str {
        if self.kernel_tpm() && Path::new(super::IMA_LOG).exists() && self.tpm.is_some() {
            MEASUREMENT_MODE_IMA
        } else {
            MEASUREMENT_MODE_KILN_SELF
        }
    }

    pub fn status(&self) -> TrustStatus {
        let st = self.state();
        TrustStatus {
            tpm: self.tpm.is_some(),
            insecure_no_tpm: self.tpm.is_none(),
            measurement_mode: self.measurement_mode().to_string(),
            locked: st.kek.is_none(),
            reason: st.reason.clone(),
            kek_id: st.kek_file.id.clone(),
            seal_pcrs: SEAL_PCRS.to_vec(),
            ak_public_pem: self.identity.ak_public_pem.clone(),
            ek_public_pem: self.identity.ek_public_pem.clone(),
        }
    }

    /// Unlocks with the recovery key (the KEK did not unseal).
    pub fn unlock(&self, recovery: &str) -> Result<(), TrustError> {
        let rk = parse_recovery_key(recovery)?;
        let mut st = self.state();
        let kek: Secret<32> = wrap::unwrap(&rk, &st.kek_file.recovery, purpose_recovery())
            .map_err(|_| TrustError::BadInput("that is not this node's recovery key".into()))?;
        st.kek = Some(kek);
        st.reason = None;
        Ok(())
    }

    /// Seals the KEK to the measurements as they are now (after an
    /// approved update). Needs the KEK: unsealed, or unlocked by the
    /// recovery key.
    pub fn reseal(&self) -> Result<(), TrustError> {
        let Some(tpm) = &self.tpm else {
            return Err(TrustError::BadInput(
                "this node has no TPM (--insecure-no-tpm): there is nothing to seal to".into(),
            ));
        };
        let files_now = self.software.measure()?;
        let mut st = self.state();
        let Some(kek) = &st.kek else {
            return Err(TrustError::Locked(format!(
                "{}; unlock with the recovery key first",
                st.reason.clone().unwrap_or_default()
            )));
        };
        let sealed = seal(tpm, kek, &files_now)?;
        let mut next = st.kek_file.clone();
        next.sealed = Some(sealed);
        next.sealed_files = files_now;
        next.updated_at = now();
        files::write(&kek_path(&self.dir), &next)?;
        st.kek_file = next;
        Ok(())
    }

    /// A new KEK: every wrapped key in `rewrap` is wrapped again by it (no
    /// volume data is touched), it is sealed, and a new recovery key is
    /// returned to show once.
    pub fn rotate_kek(
        &self,
        rewrap: &mut dyn FnMut(&Rewrap<'_>) -> Result<(), TrustError>,
    ) -> Result<String, TrustError> {
        let files_now = self.software.measure()?;
        let mut st = self.state();
        let Some(old) = st.kek.as_ref().map(Secret::duplicate) else {
            return Err(TrustError::Locked(st.reason.clone().unwrap_or_default()));
        };
        let new = Secret::<32>::random();
        let recovery = Secret::<32>::random();
        rewrap(&|w: &Wrapped, purpose: &str| {
            let dek: Secret<64> = wrap::unwrap(&old, w, purpose)
                .map_err(|e| TrustError::Failed(format!("cannot unwrap a volume key: {e}")))?;
            Ok(wrap::wrap(&new, dek.expose(), purpose))
        })?;
        let sealed = match &self.tpm {
            Some(t) => Some(seal(t, &new, &files_now)?),
            None => None,
        };
        let next = KekFile {
            id: wrap::fingerprint(new.expose()),
            sealed,
            sealed_files: files_now,
            recovery: wrap::wrap(&recovery, new.expose(), purpose_recovery()),
            insecure_plain: self.tpm.is_none().then(|| hex::encode(new.expose())),
            updated_at: now(),
        };
        files::write(&kek_path(&self.dir), &next)?;
        st.kek_file = next;
        st.kek = Some(new);
        Ok(format_recovery_key(recovery.expose()))
    }

    pub fn volume_purpose(volume_id: &str) -> String {
        format!("kiln volume key {volume_id}")
    }

    /// A new random DEK for a volume, and its wrapped form to store.
    pub fn new_volume_key(&self, volume_id: &str) -> Result<(Secret<64>, Wrapped), TrustError> {
        let st = self.state();
        let kek = st
            .kek
            .as_ref()
            .ok_or_else(|| TrustError::Locked(st.reason.clone().unwrap_or_default()))?;
        let dek = Secret::<64>::random();
        let w = wrap::wrap(kek, dek.expose(), &Self::volume_purpose(volume_id));
        Ok((dek, w))
    }

    /// Wraps an existing DEK for another volume (a clone shares its
    /// parent's key).
    pub fn wrap_volume_key(
        &self,
        volume_id: &str,
        dek: &Secret<64>,
    ) -> Result<Wrapped, TrustError> {
        let st = self.state();
        let kek = st
            .kek
            .as_ref()
            .ok_or_else(|| TrustError::Locked(st.reason.clone().unwrap_or_default()))?;
        Ok(wrap::wrap(
            kek,
            dek.expose(),
            &Self::volume_purpose(volume_id),
        ))
    }

    /// A volume's DEK, unwrapped: fails while the node is locked.
    pub fn volume_key(&self, volume_id: &str, w: &Wrapped) -> Result<Secret<64>, TrustError> {
        let st = self.state();
        let kek = st
            .kek
            .as_ref()
            .ok_or_else(|| TrustError::Locked(st.reason.clone().unwrap_or_default()))?;
        wrap::unwrap(kek, w, &Self::volume_purpose(volume_id))
            .map_err(|e| TrustError::Failed(format!("volume {volume_id}'s key: {e}")))
    }

    /// Extends a VM launch into `VM_LAUNCH_PCR` and logs it.
    pub fn measure_launch(&self, event: KilnEvent) -> Result<(), TrustError> {
        let mut st = self.state();
        let e = measure::entry(VM_LAUNCH_PCR, event);
        let digest = e.event.digest();
        st.log
            .append(e)
            .map_err(|e| TrustError::Failed(format!("Kiln's event log: {e}")))?;
        if let Some(t) = &self.tpm {
            t.pcr_extend(VM_LAUNCH_PCR, &digest)?;
        }
        Ok(())
    }

    /// A quote over `QUOTE_PCRS` answering `nonce`, with the event logs.
    pub fn evidence(&self, node: EvidenceNode, nonce: &[u8]) -> Result<Evidence, TrustError> {
        if nonce.is_empty() || nonce.len() > 64 {
            return Err(TrustError::BadInput(
                "the nonce must be 1 to 64 bytes (2 to 128 hex digits)".into(),
            ));
        }
        // The log and the PCRs are read under the lock that extends both.
        let st = self.state();
        let kiln = st.log.entries().to_vec();
        let (tpm, pcrs) = match (&self.tpm, &self.identity.ak) {
            (Some(t), Some(ak)) => {
                let q = t.quote(ak, nonce, &QUOTE_PCRS)?;
                let pcrs = q.pcrs.iter().map(|(k, v)| (*k, hex::encode(v))).collect();
                (
                    Some(TpmEvidence {
                        attest: hex::encode(&q.attest),
                        signature: hex::encode(&q.signature),
                        ak_public: hex::encode(&q.ak_public),
                        ak_public_pem: self.identity.ak_public_pem.clone().unwrap_or_default(),
                    }),
                    pcrs,
                )
            }
            _ => (None, BTreeMap::new()),
        };
        drop(st);
        Ok(Evidence {
            node,
            nonce: hex::encode(nonce),
            tpm,
            pcrs,
            logs: EventLogs {
                firmware: self.read_kernel_log(super::FIRMWARE_LOG),
                ima: self.read_kernel_log(super::IMA_LOG),
                kiln,
            },
            measurement_mode: self.measurement_mode().to_string(),
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

/// Why a sealed KEK did not unseal: the PCRs that match no branch of its
/// policy, and for Kiln's PCR the files that changed.
fn why_locked(
    tpm: &Tpm,
    blob: &crate::tpm::SealedBlob,
    sealed_files: &[Measured],
    files_now: &[Measured],
) -> String {
    let now = match tpm.pcr_read(&blob.pcrs) {
        Ok(v) => v,
        Err(e) => return format!("the measurements changed (cannot read PCRs: {e})"),
    };
    let mut parts = Vec::new();
    for (pcr, value) in &now {
        let matches = blob.branches.iter().any(|b| b.get(pcr) == Some(value));
        if matches {
            continue;
        }
        if *pcr == KILN_SOFTWARE_PCR {
            let files = measure::changed_files(sealed_files, files_now);
            if files.is_empty() {
                parts.push(format!(
                    "PCR {pcr} (Kiln's software) changed, though Kiln's files are as sealed: something else extended it"
                ));
            } else {
                parts.push(format!(
                    "PCR {pcr} (Kiln's software) changed: {}",
                    files.join("; ")
                ));
            }
        } else {
            parts.push(format!(
                "PCR {pcr} (firmware and boot chain) is {}, sealed to {}",
                hex::encode(value),
                blob.branches
                    .iter()
                    .filter_map(|b| b.get(pcr).map(hex::encode))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        }
    }
    if parts.is_empty() {
        "the TPM refused the KEK's policy although the PCRs match it".to_string()
    } else {
        format!(
            "the measurements changed since the KEK was sealed: {}",
            parts.join("; ")
        )
    }
}
