//! Sizes as people write them, read the same way everywhere in Kiln
//! (`kiln-vmm --memory`, `kiln-store volume create --size`, `kilnctl volume
//! create --size`): a whole number with an optional binary unit, `K`, `M`,
//! `G`, `T` (any case, with or without `B` or `iB`, a space allowed before
//! it), all powers of 1024. A bare number counts in the unit the caller
//! names: MiB for guest memory, as `qemu -m` and Firecracker, bytes for
//! volumes.

/// The unit of a number written without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bare {
    Bytes,
    MiB,
}

/// Why a size cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size: use a whole number with K, M, G or T (e.g. 512M, 10G)")]
    Syntax(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Reads `s` as a number of bytes; see the crate's documentation.
pub fn parse_size(s: &str, bare: Bare) -> Result<u64, SizeError> {
    let t = s.trim();
    // Whole numbers only: no fractions, signs or exponents.
    if t.is_empty() || !t.starts_with(|c: char| c.is_ascii_digit()) || t.contains(['.', 'e', 'E']) {
        return Err(SizeError::Syntax(s.into()));
    }
    let factor = match bare {
        Bare::Bytes => 1,
        Bare::MiB => 1 << 20,
    };
    parse_size::Config::new()
        .with_binary()
        .with_default_factor(factor)
        .parse_size(t)
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => SizeError::TooLarge(s.into()),
            _ => SizeError::Syntax(s.into()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units_in_any_spelling() {
        for (s, want) in [
            ("4096", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("512 MB", 512 << 20),
            ("1G", 1 << 30),
            ("1Gi", 1 << 30),
            ("2T", 2 << 40),
            (" 8M ", 8 << 20),
        ] {
            assert_eq!(parse_size(s, Bare::Bytes), Ok(want), "{s}");
        }
    }

    #[test]
    fn a_bare_number_counts_in_the_callers_unit() {
        assert_eq!(parse_size("1024", Bare::MiB), Ok(1 << 30));
        assert_eq!(parse_size("1024", Bare::Bytes), Ok(1024));
        assert_eq!(parse_size("2G", Bare::MiB), Ok(2 << 30));
        assert_eq!(parse_size("65536k", Bare::MiB), Ok(64 << 20));
    }

    #[test]
    fn nonsense_is_refused_with_the_input_named() {
        for bad in ["", "M", "12X", "-5M", "1.5G", "1e9", "+5", "5 M M"] {
            let e = parse_size(bad, Bare::Bytes).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert_eq!(
            parse_size("99999999999999999999G", Bare::MiB),
            Err(SizeError::TooLarge("99999999999999999999G".into()))
        );
        assert!(parse_size("16777216T", Bare::Bytes).is_err());
    }
}
