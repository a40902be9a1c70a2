//! What the TPM layer hands out and takes back: key and sealed-object
//! blobs (safe on disk: the private parts are wrapped by the TPM), quotes,
//! and the node's identity. Byte fields serialize as hex.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tss_esapi::structures::{Private, Public, PublicBuffer};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::TpmError;

/// The attestation key as stored by the agent: marshalled TPM2B_PUBLIC
/// and TPM2B_PRIVATE (the private part is encrypted to the EK's seed and
/// only loads in this TPM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AkBlobs {
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub private: Vec<u8>,
}

/// The node's TPM identity, made once at `kiln-agent init`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    /// The endorsement key's public key (RSA 2048, default template).
    pub ek_public_pem: String,
    /// The EK certificate from NV index 0x01c00002, where the TPM's maker
    /// put one.
    #[serde(with = "hex_bytes_opt")]
    pub ek_cert_der: Option<Vec<u8>>,
    pub ak: AkBlobs,
    pub ak_public_pem: String,
    /// The AK's TPM name: nameAlg (0x000b) and SHA-256 of its TPMT_PUBLIC.
    #[serde(with = "hex_bytes")]
    pub ak_name: Vec<u8>,
}

/// A quote in the TPM's own structures, as tpm2-tools writes them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quote {
    /// Marshalled TPMS_ATTEST (`tpm2_quote -m`, `tpm2_checkquote -m`).
    #[serde(with = "hex_bytes")]
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (`tpm2_quote -s`, `tpm2_checkquote -s`).
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    /// Marshalled TPM2B_PUBLIC of the AK (`tpm2_checkquote -u`).
    #[serde(with = "hex_bytes")]
    pub ak_public: Vec<u8>,
    /// The quoted SHA-256 PCR values; their digest is the quote's.
    #[serde(with = "hex_pcr_map")]
    pub pcrs: BTreeMap<u8, [u8; 32]>,
}

/// A secret sealed by the TPM: only this TPM can load it, and only while
/// the SHA-256 PCRs `pcrs` hold the values of one of `branches`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedBlob {
    /// Marshalled TPM2B_PUBLIC of the sealed object (holds the policy).
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    /// Marshalled TPM2B_PRIVATE, encrypted by the storage primary key.
    #[serde(with = "hex_bytes")]
    pub private: Vec<u8>,
    pub pcrs: Vec<u8>,
    #[serde(with = "hex_pcr_maps")]
    pub branches: Vec<BTreeMap<u8, [u8; 32]>>,
}

/// A TPM2B_PUBLIC for disk.
pub(crate) fn public_to_bytes(public: &Public) -> Result<Vec<u8>, TpmError> {
    PublicBuffer::try_from(public.clone())
        .and_then(|b| b.marshall())
        .map_err(|e| TpmError::Blob {
            what: "TPM2B_PUBLIC",
            why: e.to_string(),
        })
}

/// A TPM2B_PUBLIC from disk.
pub(crate) fn public_from_bytes(what: &'static str, b: &[u8]) -> Result<Public, TpmError> {
    PublicBuffer::unmarshall(b)
        .and_then(Public::try_from)
        .map_err(|e| TpmError::Blob {
            what,
            why: e.to_string(),
        })
}

/// A TPM2B_PRIVATE for disk: big-endian u16 size, then the bytes.
pub(crate) fn private_to_bytes(private: &Private) -> Vec<u8> {
    let v = private.value();
    let mut out = Vec::with_capacity(2 + v.len());
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
    out
}

/// A TPM2B_PRIVATE from disk.
pub(crate) fn private_from_bytes(what: &'static str, b: &[u8]) -> Result<Private, TpmError> {
    let bad = |why: String| TpmError::Blob { what, why };
    let (size, rest) = b
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("shorter than its size field".into()))?;
    let size = u16::from_be_bytes(*size) as usize;
    if rest.len() != size {
        return Err(bad(format!(
            "size field says {size} bytes, {} follow",
            rest.len()
        )));
    }
    Private::try_from(rest.to_vec()).map_err(|e| bad(e.to_string()))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

mod hex_bytes_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&hex::encode(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod hex_pcr_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn to_hex(m: &BTreeMap<u8, [u8; 32]>) -> BTreeMap<u8, String> {
        m.iter().map(|(k, v)| (*k, hex::encode(v))).collect()
    }

    pub fn from_hex<E: serde::de::Error>(
        m: BTreeMap<u8, String>,
    ) -> Result<BTreeMap<u8, [u8; 32]>, E> {
        m.into_iter()
            .map(|(k, v)| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(&v, &mut out)
                    .map_err(|e| E::custom(format!("PCR {k}: {e} (want 64 hex digits)")))?;
                Ok((k, out))
            })
            .collect()
    }

    pub fn serialize<S: Serializer>(m: &BTreeMap<u8, [u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        to_hex(m).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, [u8; 32]>, D::Error> {
        from_hex(BTreeMap::<u8, String>::deserialize(d)?)
    }
}

mod hex_pcr_maps {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::hex_pcr_map::{from_hex, to_hex};

    pub fn serialize<S: Serializer>(v: &[BTreeMap<u8, [u8; 32]>], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(to_hex).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<BTreeMap<u8, [u8; 32]>>, D::Error> {
        Vec::<BTreeMap<u8, String>>::deserialize(d)?
            .into_iter()
            .map(from_hex)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_blob_round_trips_through_json_as_hex() {
        let blob = SealedBlob {
            public: vec![0, 1, 0xab],
            private: vec![0, 0],
            pcrs: vec![16, 23],
            branches: vec![BTreeMap::from([(16, [0xee; 32]), (23, [0; 32])])],
        };
        let json = serde_json::to_string(&blob).unwrap();
        assert!(json.contains("\"0001ab\""), "{json}");
        assert!(json.contains(&"ee".repeat(32)), "{json}");
        assert_eq!(serde_json::from_str::<SealedBlob>(&json).unwrap(), blob);
    }

    #[test]
    fn private_blobs_are_size_prefixed_and_checked() {
        let p = Private::try_from(vec![9u8; 5]).unwrap();
        let b = private_to_bytes(&p);
        assert_eq!(b, [0, 5, 9, 9, 9, 9, 9]);
        assert_eq!(private_from_bytes("x", &b).unwrap().value(), p.value());
        assert!(private_from_bytes("x", &b[..4]).is_err());
        assert!(private_from_bytes("x", &[1]).is_err());
    }
}
