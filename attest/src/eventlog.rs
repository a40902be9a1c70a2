//! The event logs that explain PCR values: the firmware's TCG PC Client
//! crypto-agile log and Linux IMA's binary measurement list. Pure parsers
//! over hostile bytes; `replay` folds what they say was extended.

use sha2::{Digest, Sha256};

use super::reader::{err, Reader, Result};

/// PC Client TPMs have 24 PCRs.
pub const NUM_PCRS: u32 = 24;

/// PCR_new = SHA-256(PCR_old || digest), the SHA-256 bank's extend.
pub fn extend(pcr: &mut [u8; 32], digest: &[u8; 32]) {
    let mut h = Sha256::new();
    h.update(&pcr[..]);
    h.update(digest);
    *pcr = h.finalize().into();
}

/// One event that was extended into a PCR's SHA-256 bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extend {
    pub pcr: u8,
    pub digest: [u8; 32],
}

// ---------------------------------------------------------------------------
// TCG PC Client crypto-agile firmware log (TCG PC Client Platform Firmware
// Profile, section 10).

pub const EV_NO_ACTION: u32 = 0x0000_0003;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
const TPM_ALG_SHA256: u16 = 0x000b;

/// What the firmware log says happened to the SHA-256 bank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirmwareLog {
    /// PCR 0's starting locality (the StartupLocality event: 3, or 4 for
    /// an H-CRTM); PCR 0 then starts at 00..00 || locality, not all zero.
    pub startup_locality: Option<u8>,
    pub extends: Vec<Extend>,
}

/// Parses a crypto-agile log: a SHA-1-format Spec ID event, then
/// TCG_PCR_EVENT2 records whose digest lists the Spec ID event sized.
pub fn parse_firmware_log(buf: &[u8]) -> Result<FirmwareLog> {
    let mut r = Reader::new(buf, "firmware event log");
    // TCG_PCClientPCREvent (SHA-1 format) carrying TCG_EfiSpecIDEvent.
    let pcr = r.u32_le("first event pcrIndex")?;
    let ty = r.u32_le("first event eventType")?;
    r.bytes(20, "first event digest")?;
    let spec = r.lv32_le("first event data")?;
    if pcr != 0 || ty != EV_NO_ACTION || spec.len() < 16 || &spec[..16] != SPEC_ID_SIGNATURE {
        return err("firmware event log: the first event is not the crypto-agile Spec ID event (SHA-1-only logs are not supported)");
    }
    let mut s = Reader::new(spec, "Spec ID event");
    s.bytes(16, "signature")?;
    s.u32_le("platformClass")?;
    s.bytes(4, "version, errata, uintnSize")?;
    let n = s.u32_le("numberOfAlgorithms")?;
    if n == 0 || n > 16 {
        return err(format!("Spec ID event: {n} algorithms"));
    }
    let mut sizes = Vec::new();
    for _ in 0..n {
        let alg = s.u16_le("algorithmId")?;
        let size = s.u16_le("digestSize")?;
        if size == 0 || size > 64 {
            return err(format!(
                "Spec ID event: digest size {size} for alg 0x{alg:04x}"
            ));
        }
        sizes.push((alg, size));
    }
    if !sizes.iter().any(|&(a, s)| a == TPM_ALG_SHA256 && s == 32) {
        return err("firmware event log: no SHA-256 bank in its Spec ID event");
    }

    let mut log = FirmwareLog::default();
    let mut index = 0usize;
    while !r.is_empty() {
        index += 1;
        let pcr = r.u32_le("pcrIndex")?;
        let ty = r.u32_le("eventType")?;
        let count = r.u32_le("digests.count")?;
        if count > 16 {
            return err(format!("firmware event {index}: {count} digests"));
        }
        let mut sha256 = None;
        for _ in 0..count {
            let alg = r.u16_le("digest.hashAlg")?;
            let Some(&(_, size)) = sizes.iter().find(|(a, _)| *a == alg) else {
                return err(format!(
                    "firmware event {index}: digest alg 0x{alg:04x} not in the Spec ID event"
                ));
            };
            let d = r.bytes(size as usize, "digest")?;
            if alg == TPM_ALG_SHA256 {
                let mut a = [0u8; 32];
                a.copy_from_slice(d);
                sha256 = Some(a);
            }
        }
        let data = r.lv32_le("event data")?;
        if pcr >= NUM_PCRS {
            return err(format!("firmware event {index}: PCR {pcr}"));
        }
        if ty == EV_NO_ACTION {
            // Not extended; the one that matters sets PCR 0's start.
            if pcr == 0 && data.len() >= 17 && &data[..16] == STARTUP_LOCALITY_SIGNATURE {
                log.startup_locality = Some(data[16]);
            }
            continue;
        }
        let Some(digest) = sha256 else {
            return err(format!("firmware event {index}: no SHA-256 digest"));
        };
        log.extends.push(Extend {
            pcr: pcr as u8,
            digest,
        });
    }
    Ok(log)
}

// ---------------------------------------------------------------------------
// Linux IMA binary_runtime_measurements (little-endian: x86, or
// ima_canonical_fmt).

/// A file IMA measured (template ima-ng and its relatives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImaFile {
    pub pcr: u8,
    pub path: String,
    /// Hex SHA-256 of the file's content; "ALG:hex" for other algorithms.
    pub digest: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImaLog {
    pub extends: Vec<Extend>,
    pub files: Vec<ImaFile>,
    /// Entries that record a violation (open for write while measured,
    /// ToMToU): IMA extends 0xff..ff for them.
    pub violations: usize,
}

/// Parses the IMA measurement list. For every template but the original
/// "ima", the kernel extends the SHA-256 bank with SHA-256 over the
/// template data exactly as the list holds it (each field's u32 length,
/// then its bytes: `ima_calc_field_array_hash_tfm`); a violation (template
/// digest all zero) extends 32 bytes of 0xff.
pub fn parse_ima_log(buf: &[u8]) -> Result<ImaLog> {
    let mut r = Reader::new(buf, "IMA measurement list");
    let mut log = ImaLog::default();
    let mut index = 0usize;
    while !r.is_empty() {
        index += 1;
        let pcr = r.u32_le("pcr")?;
        let sha1: [u8; 20] = r.array("template digest")?;
        let name = r.lv32_le("template name")?;
        if name.len() > 255 {
            return err(format!(
                "IMA entry {index}: template name of {} bytes",
                name.len()
            ));
        }
        let name = std::str::from_utf8(name).map_err(|_| {
            super::reader::ParseError(format!("IMA entry {index}: template name is not UTF-8"))
        })?;
        let data = r.lv32_le("template data")?;
        if pcr >= NUM_PCRS {
            return err(format!("IMA entry {index}: PCR {pcr}"));
        }
        if name == "ima" {
            return err("IMA: the original \"ima\" template (SHA-1 only) is not supported; boot with ima_template=ima-ng");
        }
        let violation = sha1 == [0u8; 20];
        let digest = if violation {
            log.violations += 1;
            [0xffu8; 32]
        } else {
            Sha256::digest(data).into()
        };
        log.extends.push(Extend {
            pcr: pcr as u8,
            digest,
        });
        if violation {
            continue;
        }
        let mut fields = Reader::new(data, "IMA template data");
        let mut f = Vec::new();
        while !fields.is_empty() && f.len() < 2 {
            f.push(fields.lv32_le("field")?);
        }
        if f.len() < 2 {
            return err(format!("IMA entry {index} ({name}): fewer than two fields"));
        }
        if !matches!(
            name,
            "ima-ng" | "ima-sig" | "ima-ngv2" | "ima-sigv2" | "ima-modsig" | "ima-buf"
        ) {
            // Another template: replayed, but what it measured is unknown.
            return err(format!(
                "IMA entry {index}: template {name:?} is not supported"
            ));
        }
        let (alg, file_digest) = parse_digest_field(f[0]).ok_or_else(|| {
            super::reader::ParseError(format!("IMA entry {index}: malformed d-ng field"))
        })?;
        let path = f[1].strip_suffix(&[0]).unwrap_or(f[1]);
        let path = String::from_utf8_lossy(path).into_owned();
        let digest = if alg == "sha256" {
            hex::encode(file_digest)
        } else {
            format!("{alg}:{}", hex::encode(file_digest))
        };
        log.files.push(ImaFile {
            pcr: pcr as u8,
            path,
            digest,
        });
    }
    Ok(log)
}

/// d-ng is "ALG:\0" then the digest; d-ngv2 is "TYPE:ALG:\0" then the
/// digest. Returns the algorithm and the digest.
fn parse_digest_field(f: &[u8]) -> Option<(String, &[u8])> {
    let nul = f.iter().position(|&b| b == 0)?;
    let prefix = std::str::from_utf8(&f[..nul]).ok()?;
    let prefix = prefix.strip_suffix(':')?;
    let alg = prefix.rsplit(':').next()?;
    let digest = &f[nul + 1..];
    let want = match alg {
        "sha1" => 20,
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        _ => digest.len(),
    };
    if digest.len() != want || digest.is_empty() {
        return None;
    }
    Some((alg.to_string(), digest))
}

/// Builds one IMA ima-ng record as the kernel writes it (tests and tools).
pub fn ima_ng_record(pcr: u32, alg: &str, file_digest: &[u8], path: &str) -> Vec<u8> {
    let mut d = format!("{alg}:\0").into_bytes();
    d.extend_from_slice(file_digest);
    let mut n = path.as_bytes().to_vec();
    n.push(0);
    let mut data = Vec::new();
    for field in [&d, &n] {
        data.extend_from_slice(&(field.len() as u32).to_le_bytes());
        data.extend_from_slice(field);
    }
    let sha1 = sha1_placeholder(&data);
    let mut rec = Vec::new();
    rec.extend_from_slice(&pcr.to_le_bytes());
    rec.extend_from_slice(&sha1);
    rec.extend_from_slice(&6u32.to_le_bytes());
    rec.extend_from_slice(b"ima-ng");
    rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
    rec.extend_from_slice(&data);
    rec
}

/// The SHA-1 template digest is not checked (the SHA-1 bank is not
/// quoted); a non-zero stand-in keeps the record from reading as a
/// violation.
fn sha1_placeholder(data: &[u8]) -> [u8; 20] {
    let h: [u8; 32] = Sha256::digest(data).into();
    let mut a = [0u8; 20];
    a.copy_from_slice(&h[..20]);
    if a == [0u8; 20] {
        a[0] = 1;
    }
    a
}

/// The SHA-256 digest IMA extends for a record's template data.
pub fn ima_template_sha256(record: &[u8]) -> Option<[u8; 32]> {
    let log = parse_ima_log(record).ok()?;
    log.extends.first().map(|e| e.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ima_record_round_trips() {
        let rec = ima_ng_record(10, "sha256", &[7u8; 32], "/usr/bin/kiln-agent");
        let log = parse_ima_log(&rec).unwrap();
        assert_eq!(log.files.len(), 1);
        assert_eq!(log.files[0].path, "/usr/bin/kiln-agent");
        assert_eq!(log.files[0].digest, hex::encode([7u8; 32]));
        // Every truncation fails cleanly.
        for n in 0..rec.len() {
            assert!(parse_ima_log(&rec[..n]).is_err() || n == 0);
        }
    }

    #[test]
    fn firmware_log_with_startup_locality() {
        let mut b = Vec::new();
        // Spec ID event, SHA-1 format.
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        b.extend_from_slice(&[0u8; 20]);
        let mut spec = SPEC_ID_SIGNATURE.to_vec();
        spec.extend_from_slice(&0u32.to_le_bytes());
        spec.extend_from_slice(&[0, 2, 0, 2]);
        spec.extend_from_slice(&1u32.to_le_bytes());
        spec.extend_from_slice(&TPM_ALG_SHA256.to_le_bytes());
        spec.extend_from_slice(&32u16.to_le_bytes());
        spec.push(0);
        b.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        b.extend_from_slice(&spec);
        let ev2 = |b: &mut Vec<u8>, pcr: u32, ty: u32, d: [u8; 32], data: &[u8]| {
            b.extend_from_slice(&pcr.to_le_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&TPM_ALG_SHA256.to_le_bytes());
            b.extend_from_slice(&d);
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
        };
        let mut loc = STARTUP_LOCALITY_SIGNATURE.to_vec();
        loc.push(3);
        ev2(&mut b, 0, EV_NO_ACTION, [0; 32], &loc);
        ev2(&mut b, 0, 8, [1; 32], b"crtm");
        ev2(&mut b, 7, 0x8000_0001, [2; 32], b"sb");
        let log = parse_firmware_log(&b).unwrap();
        assert_eq!(log.startup_locality, Some(3));
        assert_eq!(log.extends.len(), 2);
        assert_eq!(
            log.extends[1],
            Extend {
                pcr: 7,
                digest: [2; 32]
            }
        );
        for n in 1..b.len() {
            let _ = parse_firmware_log(&b[..n]);
        }
    }
}
