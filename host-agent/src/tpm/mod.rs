//! The node's TPM 2.0, through tss-esapi on the system's libtss2.
//!
//! One [`Tpm`] owns one ESAPI context behind a mutex; every method is
//! blocking (the agent calls them from `spawn_blocking`) and leaves no
//! transient object or session loaded in the TPM when it returns, error or
//! not: a TPM has only a few slots.
//!
//! - PCRs: read and extend in the SHA-256 bank ([`Tpm::pcr_read`],
//!   [`Tpm::pcr_extend`]).
//! - Identity: the EK (RSA 2048, default template, recreated from the
//!   endorsement seed on each use) and an AK under it (restricted RSASSA
//!   SHA-256 signing key) whose wrapped blobs the agent stores
//!   ([`Tpm::create_identity`]).
//! - Quotes over SHA-256 PCRs with a caller's nonce, in the TPM's own
//!   structures so that `tpm2_checkquote` verifies them ([`Tpm::quote`]).
//! - Sealing a small secret under the owner hierarchy's storage primary key
//!   to a PCR policy with up to 8 alternative sets of values
//!   ([`Tpm::seal`], [`Tpm::unseal`]; digests in [`policy`]).
//!
//! The TPM is found by a TCTI string: `device:/dev/tpmrm0` (the kernel's
//! resource manager; the default) or `swtpm:host=127.0.0.1,port=2321`.

mod blobs;
mod error;
mod identity;
pub mod policy;
mod quote;
mod seal;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::{ObjectHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{CapabilityData, Digest, DigestValues, PcrSelectionList, PcrSlot};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

pub use blobs::{AkBlobs, Identity, Quote, SealedBlob};
pub use error::TpmError;
pub use identity::{EK_CERT_NV_INDEX, EK_PERSISTENT_HANDLE};
pub use policy::{pcr_policy_digest, pcr_values_digest, policy_or_digest};
pub use quote::MAX_NONCE;
pub use seal::MAX_SECRET;

use error::cmd;

/// The TCTI used when none is given: the kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// SHA-256 PCR values by PCR index.
pub type PcrValues = BTreeMap<u8, [u8; 32]>;

/// What a TPM says about itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TpmInfo {
    /// TPM_PT_MANUFACTURER as text ("IFX", "STM", "INTC", "IBM", ...).
    pub manufacturer: String,
    /// TPM_PT_VENDOR_STRING_1..4 as text.
    pub vendor: String,
    /// TPM_PT_FIRMWARE_VERSION_1 and _2.
    pub firmware: u64,
    /// A software TPM (swtpm, IBM's simulator): no hardware root of trust.
    pub software: bool,
}

/// A TPM 2.0 and the one ESAPI context that talks to it.
pub struct Tpm {
    ctx: Mutex<Slot>,
    tcti: String,
}

/// The context, or none while [`Tpm::released`] lends the TPM to another
/// process (it holds the lock all that time, so no call sees it empty).
struct Slot(Option<Context>);

impl std::ops::Deref for Slot {
    type Target = Context;
    fn deref(&self) -> &Context {
        self.0
            .as_ref()
            .expect("the TPM connection was not reopened")
    }
}

impl std::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut Context {
        self.0
            .as_mut()
            .expect("the TPM connection was not reopened")
    }
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").field("tcti", &self.tcti).finish()
    }
}

impl Tpm {
    /// Opens the TPM at `tcti` (default [`DEFAULT_TCTI`]).
    pub fn open(tcti: Option<&str>) -> Result<Tpm, TpmError> {
        let tcti = tcti.unwrap_or(DEFAULT_TCTI).trim().to_string();
        let conf = TctiNameConf::from_str(&tcti).map_err(|_| TpmError::BadTcti(tcti.clone()))?;
        if let Some(path) = tcti.strip_prefix("device:") {
            // libtss2 would only say "IO failure"; say which file is missing.
            if !path.is_empty() && !std::path::Path::new(path).exists() {
                return Err(TpmError::NotFound {
                    tcti,
                    reason: "the device file does not exist".into(),
                });
            }
        }
        let ctx = connect(&tcti, conf)?;
        Ok(Tpm {
            ctx: Mutex::new(Slot(Some(ctx))),
            tcti,
        })
    }

    /// Runs `f` with this process's connection to the TPM closed, for a
    /// child process that needs the TPM (a swtpm serves one connection at
    /// a time), and opens it again after. Other calls wait meanwhile.
    pub fn released<R>(&self, f: impl FnOnce() -> R) -> Result<R, TpmError> {
        let mut slot = self.ctx();
        drop(slot.0.take());
        let r = f();
        let conf =
            TctiNameConf::from_str(&self.tcti).map_err(|_| TpmError::BadTcti(self.tcti.clone()))?;
        slot.0 = Some(connect(&self.tcti, conf)?);
        Ok(r)
    }

    /// The TCTI this TPM was opened at.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// The context; a panic in another call does not poison the TPM (every
    /// method leaves the context without loaded objects).
    fn ctx(&self) -> MutexGuard<'_, Slot> {
        self.ctx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who made the TPM and whether it is a software TPM (swtpm, IBM's
    /// simulator), which proves nothing about the machine: the agent
    /// reports that loudly.
    pub fn info(&self) -> Result<TpmInfo, TpmError> {
        let mut ctx = self.ctx();
        let mut prop = |tag| {
            ctx.get_tpm_property(tag)
                .map(Option::unwrap_or_default)
                .map_err(cmd("read the TPM's properties"))
        };
        let text = |words: &[u32]| -> String {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            String::from_utf8_lossy(&bytes)
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        };
        let manufacturer = text(&[prop(PropertyTag::Manufacturer)?]);
        let vendor = text(&[
            prop(PropertyTag::VendorString1)?,
            prop(PropertyTag::VendorString2)?,
            prop(PropertyTag::VendorString3)?,
            prop(PropertyTag::VendorString4)?,
        ]);
        let firmware = (u64::from(prop(PropertyTag::FirmwareVersion1)?) << 32)
            | u64::from(prop(PropertyTag::FirmwareVersion2)?);
        let software = vendor.replace([' ', '\0'], "") == "SWTPM";
        Ok(TpmInfo {
            manufacturer,
            vendor,
            firmware,
            software,
        })
    }

    /// How many transient objects and sessions are loaded in the TPM now:
    /// 0 between calls, since every method flushes what it loaded (a check
    /// for tests and health reports).
    pub fn loaded_handles(&self) -> Result<usize, TpmError> {
        let mut ctx = self.ctx();
        let mut n = 0;
        // Transient objects (0x80), then loaded sessions, listed as HMAC
        // (0x02) and policy (0x03) handles (TPM 2.0 Part 2, 7.2).
        for (first, kinds) in [
            (0x8000_0000u32, &[0x80u32][..]),
            (0x0200_0000, &[0x02, 0x03]),
        ] {
            let (data, _) = ctx
                .get_capability(CapabilityType::Handles, first, 64)
                .map_err(cmd("list loaded handles"))?;
            if let CapabilityData::Handles(list) = data {
                n += list
                    .into_inner()
                    .into_iter()
                    .filter(|h| kinds.contains(&(u32::from(*h) >> 24)))
                    .count();
            }
        }
        Ok(n)
    }

    /// The SHA-256 values of `pcrs`.
    pub fn pcr_read(&self, pcrs: &[u8]) -> Result<PcrValues, TpmError> {
        read_pcrs(&mut self.ctx(), pcrs)
    }

    /// Extends SHA-256 PCR `pcr` with `digest`: it becomes
    /// SHA-256(old || digest).
    pub fn pcr_extend(&self, pcr: u8, digest: &[u8; 32]) -> Result<(), TpmError> {
        policy::check_pcrs(&[pcr])?;
        let handle = PCR_HANDLES[pcr as usize];
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.as_slice()).map_err(cmd("build a PCR digest"))?,
        );
        self.ctx()
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(cmd("extend a PCR"))
    }
}

const PCR_HANDLES: [PcrHandle; policy::PCR_COUNT as usize] = [
    PcrHandle::Pcr0,
    PcrHandle::Pcr1,
    PcrHandle::Pcr2,
    PcrHandle::Pcr3,
    PcrHandle::Pcr4,
    PcrHandle::Pcr5,
    PcrHandle::Pcr6,
    PcrHandle::Pcr7,
    PcrHandle::Pcr8,
    PcrHandle::Pcr9,
    PcrHandle::Pcr10,
    PcrHandle::Pcr11,
    PcrHandle::Pcr12,
    PcrHandle::Pcr13,
    PcrHandle::Pcr14,
    PcrHandle::Pcr15,
    PcrHandle::Pcr16,
    PcrHandle::Pcr17,
    PcrHandle::Pcr18,
    PcrHandle::Pcr19,
    PcrHandle::Pcr20,
    PcrHandle::Pcr21,
    PcrHandle::Pcr22,
    PcrHandle::Pcr23,
];

/// The SHA-256 selection of `pcrs` (checked).
fn selection(pcrs: &[u8]) -> Result<PcrSelectionList, TpmError> {
    policy::check_pcrs(pcrs)?;
    let slots = pcrs
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(cmd("select PCRs"))?;
    PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(cmd("select PCRs"))
}

/// Reads `pcrs` (several TPM2_PCR_Read calls where needed).
fn connect(tcti: &str, conf: TctiNameConf) -> Result<Context, TpmError> {
    Context::new(conf).map_err(|e| TpmError::NotFound {
        tcti: tcti.to_string(),
        reason: e.to_string(),
    })
}

fn read_pcrs(ctx: &mut Context, pcrs: &[u8]) -> Result<PcrValues, TpmError> {
    let data =
        tss_esapi::abstraction::pcr::read_all(ctx, selection(pcrs)?).map_err(cmd("read PCRs"))?;
    let bank = data
        .pcr_bank(HashingAlgorithm::Sha256)
        .ok_or_else(|| TpmError::Invalid("this TPM has no active SHA-256 PCR bank".into()))?;
    let mut out = BTreeMap::new();
    for &p in pcrs {
        let slot = PcrSlot::try_from(1u32 << p).map_err(cmd("select PCRs"))?;
        let d = bank.get_digest(slot).ok_or_else(|| {
            TpmError::Invalid(format!("the TPM returned no SHA-256 value for PCR {p}"))
        })?;
        let v: [u8; 32] = d
            .value()
            .try_into()
            .map_err(|_| TpmError::Invalid(format!("PCR {p}'s SHA-256 value is not 32 bytes")))?;
        out.insert(p, v);
    }
    Ok(out)
}

/// Flushes `handle` from the TPM, then returns `result` (its error first:
/// the flush error matters only when all else went well).
fn flushed<T>(
    ctx: &mut Context,
    handle: impl Into<ObjectHandle>,
    result: Result<T, TpmError>,
) -> Result<T, TpmError> {
    let flush = ctx
        .flush_context(handle.into())
        .map_err(cmd("flush a transient object"));
    let v = result?;
    flush?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tpm_can_be_shared_with_blocking_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Tpm>();
    }

    #[test]
    fn a_missing_device_or_a_bad_address_is_named() {
        let e = Tpm::open(Some("device:/dev/kiln-none")).unwrap_err();
        assert_eq!(
            e.to_string().split(':').take(2).collect::<Vec<_>>(),
            ["no TPM at device", "/dev/kiln-none"]
        );
        assert!(matches!(
            Tpm::open(Some("tcp://x")),
            Err(TpmError::BadTcti(_))
        ));
    }
}
