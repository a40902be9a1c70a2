//! Key bytes in memory the way the issue asks for them: locked (`mlock`,
//! never swapped), kept out of core dumps (`MADV_DONTDUMP`), zeroed when
//! dropped, and never printed.

use std::fmt;

use zeroize::Zeroize;

/// `N` secret bytes on their own page(s).
pub struct Secret<const N: usize> {
    bytes: Box<Page<N>>,
}

/// Page-aligned so that `madvise` covers exactly the key and nothing else
/// shares its pages.
#[repr(C, align(4096))]
struct Page<const N: usize>([u8; N]);

impl<const N: usize> Secret<N> {
    /// Random bytes from the operating system.
    pub fn random() -> Secret<N> {
        let mut s = Self::zeroed();
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s.bytes.0);
        s
    }

    /// Takes a copy of `src` and wipes `src`. `None` if the length is wrong.
    pub fn take(src: &mut [u8]) -> Option<Secret<N>> {
        if src.len() != N {
            src.zeroize();
            return None;
        }
        let mut s = Self::zeroed();
        s.bytes.0.copy_from_slice(src);
        src.zeroize();
        Some(s)
    }

    /// Zeros, to be filled in place (say, by a read from a pipe).
    pub fn zeroed() -> Secret<N> {
        let bytes = Box::new(Page([0u8; N]));
        let ptr = bytes.0.as_ptr() as *mut libc::c_void;
        let len = std::mem::size_of::<Page<N>>();
        // SAFETY: `ptr..ptr+len` is the box's own page-aligned allocation,
        // alive for the duration of both calls; mlock and madvise only
        // change how the kernel pages it. A failure (RLIMIT_MEMLOCK too low)
        // is logged, not fatal: the bytes are still zeroed on drop.
        unsafe {
            if libc::mlock(ptr, len) != 0 {
                tracing::warn!(
                    "cannot lock key memory (mlock): {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::madvise(ptr, len, libc::MADV_DONTDUMP);
        }
        Secret { bytes }
    }

    pub fn expose(&self) -> &[u8; N] {
        &self.bytes.0
    }

    pub fn expose_mut(&mut self) -> &mut [u8; N] {
        &mut self.bytes.0
    }

    pub fn duplicate(&self) -> Secret<N> {
        let mut s = Self::zeroed();
        s.bytes.0.copy_from_slice(&self.bytes.0);
        s
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        self.bytes.0.zeroize();
        let ptr = self.bytes.0.as_ptr() as *mut libc::c_void;
        // SAFETY: the same allocation that `zeroed` locked, still alive.
        unsafe {
            libc::munlock(ptr, std::mem::size_of::<Page<N>>());
        }
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret<{N}>(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_wipes_its_source_and_refuses_a_wrong_length() {
        let mut src = [7u8; 32];
        let s = Secret::<32>::take(&mut src).unwrap();
        assert_eq!(s.expose(), &[7u8; 32]);
        assert_eq!(src, [0u8; 32]);
        let mut short = [1u8; 31];
        assert!(Secret::<32>::take(&mut short).is_none());
        assert_eq!(short, [0u8; 31]);
    }

    #[test]
    fn random_keys_differ_and_never_print() {
        let (a, b) = (Secret::<32>::random(), Secret::<32>::random());
        assert_ne!(a.expose(), b.expose());
        let shown = format!("{a:?}");
        assert!(!shown.contains(&hex::encode(a.expose())));
        assert!(shown.contains("redacted"));
    }
}
