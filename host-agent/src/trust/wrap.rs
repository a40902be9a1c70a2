//! Wrapping one key with another: AES-256-GCM with a random 96-bit nonce
//! and the wrapped key's purpose as associated data, so a wrapped key
//! moved to another record (another volume's id) does not unwrap.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};

use super::secret::Secret;

/// A key wrapped by another: safe to store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Wrapped {
    /// Which wrapping key: its fingerprint (see [`fingerprint`]).
    pub by: String,
    pub nonce: String,
    pub ciphertext: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("the key was wrapped by key {wrapped_by}, not by {have}")]
    OtherKey { wrapped_by: String, have: String },
    #[error("the wrapped key does not unwrap (wrong key, wrong record, or it was altered)")]
    Corrupt,
    #[error("the unwrapped key has {0} bytes, not the {1} expected")]
    Length(usize, usize),
}

/// A public name for a key: the first 8 bytes of SHA-256 over a domain
/// string and the key, in hex. Reveals nothing useful about a random
/// 256-bit key.
pub fn fingerprint(key: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"kiln key fingerprint v1\0");
    h.update(key);
    hex::encode(&h.finalize()[..8])
}

pub fn wrap(kek: &Secret<32>, key: &[u8], purpose: &str) -> Wrapped {
    let cipher = Aes256Gcm::new(kek.expose().into());
    let mut nonce = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: key,
                aad: purpose.as_bytes(),
            },
        )
        // Encryption fails only for plaintexts past 64 GiB.
        .expect("AES-GCM encryption of a key");
    Wrapped {
        by: fingerprint(kek.expose()),
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ciphertext),
    }
}

pub fn unwrap<const N: usize>(
    kek: &Secret<32>,
    w: &Wrapped,
    purpose: &str,
) -> Result<Secret<N>, WrapError> {
    let have = fingerprint(kek.expose());
    if w.by != have {
        return Err(WrapError::OtherKey {
            wrapped_by: w.by.clone(),
            have,
        });
    }
    let nonce = hex::decode(&w.nonce).map_err(|_| WrapError::Corrupt)?;
    let ct = hex::decode(&w.ciphertext).map_err(|_| WrapError::Corrupt)?;
    if nonce.len() != 12 {
        return Err(WrapError::Corrupt);
    }
    let cipher = Aes256Gcm::new(kek.expose().into());
    let mut plain = cipher
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &ct,
                aad: purpose.as_bytes(),
            },
        )
        .map_err(|_| WrapError::Corrupt)?;
    let len = plain.len();
    Secret::take(&mut plain).ok_or(WrapError::Length(len, N))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_unwraps_only_with_its_key_and_purpose() {
        let kek = Secret::<32>::random();
        let dek = Secret::<64>::random();
        let w = wrap(&kek, dek.expose(), "volume:a");
        assert!(!w.ciphertext.contains(&hex::encode(dek.expose())));
        let back: Secret<64> = unwrap(&kek, &w, "volume:a").unwrap();
        assert_eq!(back.expose(), dek.expose());
        assert!(matches!(
            unwrap::<64>(&kek, &w, "volume:b"),
            Err(WrapError::Corrupt)
        ));
        let other = Secret::<32>::random();
        assert!(matches!(
            unwrap::<64>(&other, &w, "volume:a"),
            Err(WrapError::OtherKey { .. })
        ));
        let mut bad = w.clone();
        bad.ciphertext.replace_range(
            0..2,
            if &w.ciphertext[0..2] == "00" {
                "01"
            } else {
                "00"
            },
        );
        assert!(matches!(
            unwrap::<64>(&kek, &bad, "volume:a"),
            Err(WrapError::Corrupt)
        ));
        assert!(matches!(
            unwrap::<32>(&kek, &w, "volume:a"),
            Err(WrapError::Length(64, 32))
        ));
    }
}
