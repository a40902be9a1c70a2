//! The TPM 2.0 structures of a quote, unmarshalled from their wire bytes
//! (TPM 2.0 Library, Part 2): TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC.
//! Pure code over bytes, no TPM and no C library: a verifier on another
//! machine, and the fuzzer, run it.

use super::reader::{err, Reader, Result};

/// TPM_GENERATED_VALUE: "\xffTCG", only the TPM writes it into a structure
/// it signs with a restricted key.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

pub const TPM_ALG_RSA: u16 = 0x0001;
pub const TPM_ALG_SHA1: u16 = 0x0004;
pub const TPM_ALG_SHA256: u16 = 0x000b;
pub const TPM_ALG_SHA384: u16 = 0x000c;
pub const TPM_ALG_SHA512: u16 = 0x000d;
pub const TPM_ALG_NULL: u16 = 0x0010;
pub const TPM_ALG_RSASSA: u16 = 0x0014;
pub const TPM_ALG_RSAPSS: u16 = 0x0016;
pub const TPM_ALG_ECDSA: u16 = 0x0018;

/// TPMA_OBJECT bits an attestation key must have.
pub const TPMA_OBJECT_FIXEDTPM: u32 = 1 << 1;
pub const TPMA_OBJECT_RESTRICTED: u32 = 1 << 16;
pub const TPMA_OBJECT_SIGN_ENCRYPT: u32 = 1 << 18;

/// A name for a TPM_ALG_ID in messages.
pub fn alg_name(alg: u16) -> String {
    match alg {
        TPM_ALG_RSA => "rsa".into(),
        TPM_ALG_SHA1 => "sha1".into(),
        TPM_ALG_SHA256 => "sha256".into(),
        TPM_ALG_SHA384 => "sha384".into(),
        TPM_ALG_SHA512 => "sha512".into(),
        TPM_ALG_NULL => "null".into(),
        TPM_ALG_RSASSA => "rsassa".into(),
        TPM_ALG_RSAPSS => "rsapss".into(),
        TPM_ALG_ECDSA => "ecdsa".into(),
        a => format!("alg 0x{a:04x}"),
    }
}

/// One TPMS_PCR_SELECTION: a bank and the PCRs chosen in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    pub hash: u16,
    /// Selected PCR indices, ascending (the order the TPM hashes them in).
    pub pcrs: Vec<u8>,
}

/// A TPMS_ATTEST of type quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub magic: u32,
    pub attest_type: u16,
    pub qualified_signer: Vec<u8>,
    /// The caller's nonce.
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
    pub firmware_version: u64,
    pub pcr_select: Vec<PcrSelection>,
    pub pcr_digest: Vec<u8>,
}

/// Unmarshals a TPMS_ATTEST. Magic and type are returned, not checked here,
/// so the verifier can name them; anything but a quote's body fails.
pub fn parse_attest(buf: &[u8]) -> Result<Quote> {
    let mut r = Reader::new(buf, "TPMS_ATTEST");
    let magic = r.u32_be("magic")?;
    let attest_type = r.u16_be("type")?;
    if attest_type != TPM_ST_ATTEST_QUOTE {
        return err(format!(
            "TPMS_ATTEST: type 0x{attest_type:04x} is not TPM_ST_ATTEST_QUOTE (0x8018)"
        ));
    }
    let qualified_signer = r.tpm2b("qualifiedSigner")?.to_vec();
    let extra_data = r.tpm2b("extraData")?.to_vec();
    let clock = r.u64_be("clockInfo.clock")?;
    let reset_count = r.u32_be("clockInfo.resetCount")?;
    let restart_count = r.u32_be("clockInfo.restartCount")?;
    let safe = r.u8("clockInfo.safe")? != 0;
    let firmware_version = r.u64_be("firmwareVersion")?;
    let count = r.u32_be("pcrSelect.count")?;
    // TPM2_NUM_PCR_BANKS is 16 in the reference implementation.
    if count > 16 {
        return err(format!("TPMS_ATTEST: {count} PCR selections (at most 16)"));
    }
    let mut pcr_select = Vec::new();
    for _ in 0..count {
        let hash = r.u16_be("pcrSelection.hash")?;
        let size = r.u8("pcrSelection.sizeofSelect")?;
        // PCR_SELECT_MAX is 4 bytes (32 PCRs) on every PC Client TPM.
        if size > 4 {
            return err(format!(
                "TPMS_ATTEST: PCR select of {size} bytes (at most 4)"
            ));
        }
        let bits = r.bytes(size as usize, "pcrSelection.pcrSelect")?;
        let mut pcrs = Vec::new();
        for (i, b) in bits.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pcrs.push((i * 8 + bit) as u8);
                }
            }
        }
        pcr_select.push(PcrSelection { hash, pcrs });
    }
    let pcr_digest = r.tpm2b("pcrDigest")?.to_vec();
    r.finish()?;
    Ok(Quote {
        magic,
        attest_type,
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        pcr_select,
        pcr_digest,
    })
}

/// A TPMT_SIGNATURE: the scheme, its hash and the raw signature bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmSignature {
    pub scheme: u16,
    pub hash: u16,
    /// RSA: the signature. ECDSA: r then s (kept for messages only).
    pub sig: Vec<u8>,
}

pub fn parse_signature(buf: &[u8]) -> Result<TpmSignature> {
    let mut r = Reader::new(buf, "TPMT_SIGNATURE");
    let scheme = r.u16_be("sigAlg")?;
    let sig = match scheme {
        TPM_ALG_RSASSA | TPM_ALG_RSAPSS => {
            let hash = r.u16_be("hash")?;
            let sig = r.tpm2b("sig")?.to_vec();
            TpmSignature { scheme, hash, sig }
        }
        TPM_ALG_ECDSA => {
            let hash = r.u16_be("hash")?;
            let mut sig = r.tpm2b("signatureR")?.to_vec();
            sig.extend_from_slice(r.tpm2b("signatureS")?);
            TpmSignature { scheme, hash, sig }
        }
        s => {
            return err(format!(
                "TPMT_SIGNATURE: scheme {} is not supported (rsassa or rsapss)",
                alg_name(s)
            ))
        }
    };
    r.finish()?;
    Ok(sig)
}

/// The parts of an RSA TPMT_PUBLIC the verifier needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaAkPublic {
    pub name_alg: u16,
    pub attributes: u32,
    /// The key's own signing scheme (TPM_ALG_NULL: any).
    pub scheme: u16,
    pub scheme_hash: u16,
    pub key_bits: u16,
    pub exponent: u32,
    pub modulus: Vec<u8>,
}

/// Unmarshals a TPM2B_PUBLIC holding an RSA key. A bare TPMT_PUBLIC (what
/// tss-esapi's `Public::marshall` writes) is taken too: it starts with the
/// key type, never with its own remaining length.
pub fn parse_public(buf: &[u8]) -> Result<RsaAkPublic> {
    let sized =
        buf.len() >= 2 && usize::from(u16::from_be_bytes([buf[0], buf[1]])) == buf.len() - 2;
    let inner = if sized {
        let mut outer = Reader::new(buf, "TPM2B_PUBLIC");
        let inner = outer.tpm2b("size")?;
        outer.finish()?;
        inner
    } else {
        buf
    };
    let mut r = Reader::new(inner, "TPMT_PUBLIC");
    let kind = r.u16_be("type")?;
    if kind != TPM_ALG_RSA {
        return err(format!(
            "TPMT_PUBLIC: key type {} is not supported (rsa)",
            alg_name(kind)
        ));
    }
    let name_alg = r.u16_be("nameAlg")?;
    let attributes = r.u32_be("objectAttributes")?;
    r.tpm2b("authPolicy")?;
    let sym = r.u16_be("parameters.symmetric.algorithm")?;
    if sym != TPM_ALG_NULL {
        r.u16_be("parameters.symmetric.keyBits")?;
        r.u16_be("parameters.symmetric.mode")?;
    }
    let scheme = r.u16_be("parameters.scheme")?;
    let scheme_hash = if scheme != TPM_ALG_NULL {
        r.u16_be("parameters.scheme.hashAlg")?
    } else {
        TPM_ALG_NULL
    };
    let key_bits = r.u16_be("parameters.keyBits")?;
    let exponent = r.u32_be("parameters.exponent")?;
    let modulus = r.tpm2b("unique.rsa")?.to_vec();
    r.finish()?;
    Ok(RsaAkPublic {
        name_alg,
        attributes,
        scheme,
        scheme_hash,
        key_bits,
        // 0 means the default exponent 2^16 + 1.
        exponent: if exponent == 0 { 65537 } else { exponent },
        modulus,
    })
}
