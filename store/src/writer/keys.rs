//! The writer's keys: which cipher covers which block of an encrypted
//! volume (the old key above a rekey's watermark, the new one below), and
//! the checks that the keys given at attach are the volume's.

use crate::crypt::{key_check, BlockCipher, VolumeKey};
use crate::error::{Error, Result};
use crate::proto::RekeyStatus;
use crate::types::CryptRec;

/// The keys supplied to attach: the volume's, and a rekey's new one.
#[derive(Default)]
pub struct Keys {
    pub key: Option<VolumeKey>,
    pub next_key: Option<VolumeKey>,
}

pub(crate) struct Keyed {
    pub key: VolumeKey,
    pub cipher: BlockCipher,
}

impl Keyed {
    fn new(key: VolumeKey) -> Result<Keyed> {
        let cipher = BlockCipher::new(&key)?;
        Ok(Keyed { key, cipher })
    }
}

/// An attached encrypted volume's keys and its record as the replicas hold
/// it.
pub(crate) struct VolumeCrypt {
    pub cur: Keyed,
    /// A rekey's new key; covers the blocks below `watermark` (bytes).
    pub next: Option<Keyed>,
    pub watermark: u64,
    /// What every in-sync replica records (key check, rekey progress).
    pub rec: CryptRec,
}

/// Are `key` / `next_key` right for a volume recorded as `rec`? Errors say
/// what is wrong and never show a key, only checks.
pub(crate) fn check_keys(
    name: &str,
    rec: Option<&CryptRec>,
    key: Option<&VolumeKey>,
    next_key: Option<&VolumeKey>,
) -> Result<()> {
    let Some(rec) = rec else {
        if key.is_some() || next_key.is_some() {
            return Err(Error::Invalid(format!(
                "{name} is not encrypted; it takes no key"
            )));
        }
        return Ok(());
    };
    let Some(key) = key else {
        return Err(Error::Invalid(format!(
            "{name} is encrypted (key check {}): attach it with its key",
            rec.key_check
        )));
    };
    let got = key_check(key);
    match &rec.rekey {
        None => {
            // A next key with no rekey in progress is not needed (a rekey
            // that never started, say): the key alone decides.
            if got == rec.key_check {
                return Ok(());
            }
            // A rekey that finished: the new key is the key.
            if next_key.is_some_and(|n| key_check(n) == rec.key_check) {
                return Ok(());
            }
            Err(Error::Invalid(format!(
                "wrong key for {name}: its key check is {}, the key given has {got}",
                rec.key_check
            )))
        }
        Some(r) => {
            if got != rec.key_check {
                return Err(Error::Invalid(format!(
                    "wrong key for {name}: its key check is {}, the key given has {got}",
                    rec.key_check
                )));
            }
            match next_key.map(key_check) {
                Some(n) if n == r.next_key_check => Ok(()),
                Some(n) => Err(Error::Invalid(format!(
                    "wrong new key for {name}: a rekey to key check {} is in progress, the \
                     new key given has {n}",
                    r.next_key_check
                ))),
                None => Err(Error::Invalid(format!(
                    "a rekey of {name} to key check {} was interrupted: attach it with both \
                     keys (the new one as the next key) to resume it",
                    r.next_key_check
                ))),
            }
        }
    }
}

impl VolumeCrypt {
    /// The volume's keys after [`check_keys`] accepted them.
    pub fn open(name: &str, rec: Option<&CryptRec>, keys: Keys) -> Result<Option<VolumeCrypt>> {
        check_keys(name, rec, keys.key.as_ref(), keys.next_key.as_ref())?;
        let (Some(rec), Some(key)) = (rec, keys.key) else {
            return Ok(None);
        };
        match &rec.rekey {
            None if key_check(&key) == rec.key_check => Ok(Some(VolumeCrypt {
                cur: Keyed::new(key)?,
                next: None,
                watermark: 0,
                rec: rec.clone(),
            })),
            None => {
                let next = keys.next_key.expect("checked: the next key is the key");
                Ok(Some(VolumeCrypt {
                    cur: Keyed::new(next)?,
                    next: None,
                    watermark: 0,
                    rec: rec.clone(),
                }))
            }
            Some(r) => Ok(Some(VolumeCrypt {
                cur: Keyed::new(key)?,
                next: Some(Keyed::new(keys.next_key.expect("checked"))?),
                watermark: r.watermark,
                rec: rec.clone(),
            })),
        }
    }

    /// Do these keys fit the volume as attached (for an attach request on
    /// an attached volume)?
    pub fn accepts(&self, name: &str, keys: &Keys) -> Result<()> {
        check_keys(
            name,
            Some(&self.rec),
            keys.key.as_ref(),
            keys.next_key.as_ref(),
        )
    }

    /// Starts a rekey to `key` (the record is the caller's to persist).
    pub fn begin_rekey(&mut self, key: VolumeKey) -> Result<()> {
        let check = key_check(&key);
        if check == self.rec.key_check {
            return Err(Error::Invalid(
                "the new key is the volume's current key".into(),
            ));
        }
        self.next = Some(Keyed::new(key)?);
        self.watermark = 0;
        self.rec.rekey = Some(crate::types::RekeyRec {
            next_key_check: check,
            watermark: 0,
            hot: None,
        });
        Ok(())
    }

    /// The rekey is complete: the new key is the key.
    pub fn finish_rekey(&mut self) {
        if let Some(next) = self.next.take() {
            self.rec = CryptRec {
                key_check: next.cipher.check().to_string(),
                rekey: None,
            };
            self.cur = next;
            self.watermark = 0;
        }
    }

    pub fn rekey_status(&self, size: u64) -> Option<RekeyStatus> {
        let r = self.rec.rekey.as_ref()?;
        Some(RekeyStatus {
            done: self.watermark.min(size),
            total: size,
            next_key_check: r.next_key_check.clone(),
        })
    }

    /// Applies `f` (encrypt or decrypt) to `buf` at `offset`, each part
    /// with the cipher that covers it.
    fn apply(
        &self,
        buf: &mut [u8],
        offset: u64,
        f: impl Fn(&BlockCipher, &mut [u8], u64) -> std::result::Result<(), crate::crypt::CryptError>,
    ) -> Result<()> {
        match &self.next {
            Some(next) if offset < self.watermark => {
                let split = ((self.watermark - offset) as usize).min(buf.len());
                let (lo, hi) = buf.split_at_mut(split);
                f(&next.cipher, lo, offset)?;
                f(&self.cur.cipher, hi, offset + split as u64)?;
            }
            _ => f(&self.cur.cipher, buf, offset)?,
        }
        Ok(())
    }

    pub fn encrypt(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.apply(buf, offset, |c, b, o| c.encrypt(b, o))
    }

    pub fn decrypt(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.apply(buf, offset, |c, b, o| c.decrypt(b, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(k: &VolumeKey) -> CryptRec {
        CryptRec {
            key_check: key_check(k),
            rekey: None,
        }
    }

    #[test]
    fn attach_keys_are_checked_against_the_record() {
        let (a, b) = (VolumeKey::random().unwrap(), VolumeKey::random().unwrap());
        let r = rec(&a);
        assert!(check_keys("v", None, None, None).is_ok());
        let e = check_keys("v", None, Some(&a), None).unwrap_err();
        assert!(e.to_string().contains("not encrypted"), "{e}");
        let e = check_keys("v", Some(&r), None, None).unwrap_err();
        assert!(e.to_string().contains("is encrypted"), "{e}");
        let e = check_keys("v", Some(&r), Some(&b), None).unwrap_err();
        assert!(e.to_string().contains("wrong key"), "{e}");
        assert!(check_keys("v", Some(&r), Some(&a), None).is_ok());
        // A finished rekey: the old key plus the new one is accepted, and
        // so is a next key when no rekey is in progress.
        assert!(check_keys("v", Some(&r), Some(&b), Some(&a)).is_ok());
        assert!(check_keys("v", Some(&r), Some(&a), Some(&b)).is_ok());
        let c = VolumeKey::random().unwrap();
        assert!(check_keys("v", Some(&r), Some(&b), Some(&c)).is_err());
        let mut mid = r.clone();
        mid.rekey = Some(crate::types::RekeyRec {
            next_key_check: key_check(&b),
            watermark: 0,
            hot: None,
        });
        let e = check_keys("v", Some(&mid), Some(&a), None).unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
        assert!(check_keys("v", Some(&mid), Some(&a), Some(&b)).is_ok());
        assert!(check_keys("v", Some(&mid), Some(&a), Some(&a)).is_err());
    }

    #[test]
    fn below_the_watermark_the_new_key_applies() {
        let (a, b) = (VolumeKey::random().unwrap(), VolumeKey::random().unwrap());
        let mut vc = VolumeCrypt::open(
            "v",
            Some(&rec(&a)),
            Keys {
                key: Some(a.clone()),
                next_key: None,
            },
        )
        .unwrap()
        .unwrap();
        vc.begin_rekey(b.clone()).unwrap();
        vc.watermark = 4096;
        let pt = vec![9u8; 8192];
        let mut buf = pt.clone();
        vc.encrypt(&mut buf, 0).unwrap();
        let (mut lo, mut hi) = (pt[..4096].to_vec(), pt[4096..].to_vec());
        BlockCipher::new(&b).unwrap().encrypt(&mut lo, 0).unwrap();
        BlockCipher::new(&a)
            .unwrap()
            .encrypt(&mut hi, 4096)
            .unwrap();
        assert_eq!(&buf[..4096], &lo[..]);
        assert_eq!(&buf[4096..], &hi[..]);
        vc.decrypt(&mut buf, 0).unwrap();
        assert_eq!(buf, pt);
        vc.finish_rekey();
        assert_eq!(vc.rec.key_check, key_check(&b));
        assert!(vc.rec.rekey.is_none());
    }
}
