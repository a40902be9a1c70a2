//! Reading a bzImage: its setup header, and the compressed vmlinux inside.
//!
//! Layout (Documentation/arch/x86/boot.rst): the real-mode setup code is
//! `setup_sects + 1` sectors; the protected-mode code follows, and the
//! compressed kernel sits at `payload_offset` within it, `payload_length`
//! bytes long (boot protocol 2.08+).

use std::io::Read;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_OFFSET: usize = 0x202;
const BOOT_FLAG_OFFSET: usize = 0x1fe;
/// xloadflags bit: the kernel has a 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// The first boot-protocol version that records the payload's position.
const MIN_PROTOCOL_FOR_PAYLOAD: u16 = 0x0208;
/// A Linux vmlinux is far below this; anything larger is refused.
const MAX_VMLINUX_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bzImage is truncated")]
    Truncated,
    #[error("bzImage boot protocol {0:#x} is too old (needs 2.08 or later)")]
    OldProtocol(u16),
    #[error("bzImage has no 64-bit entry point")]
    Not64Bit,
    #[error("bzImage payload lies outside the file")]
    BadPayload,
    #[error(
        "bzImage payload uses an unsupported compression (magic {0:02x?}); try --bzimage native"
    )]
    UnsupportedCompression([u8; 4]),
    #[error("cannot decompress the bzImage payload: {0}")]
    Decompress(std::io::Error),
    #[error("the decompressed payload is not an ELF vmlinux")]
    NotElf,
    #[error("the decompressed payload exceeds {} MiB", MAX_VMLINUX_SIZE >> 20)]
    TooLarge,
}

/// True when `head` (the file's first bytes) carries a bzImage header.
pub fn is_bzimage(head: &[u8]) -> bool {
    head.len() >= HDRS_OFFSET + 4
        && &head[HDRS_OFFSET..HDRS_OFFSET + 4] == b"HdrS"
        && head[BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2] == [0x55, 0xaa]
}

/// The setup header, as the kernel's own boot loader protocol defines it.
pub fn setup_header_of(image: &[u8]) -> Result<setup_header, Error> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = image
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or(Error::Truncated)?;
    setup_header::from_slice(bytes)
        .copied()
        .ok_or(Error::Truncated)
}

/// The compressed payload's bytes.
pub fn payload(image: &[u8]) -> Result<&[u8], Error> {
    if !is_bzimage(image) {
        return Err(Error::Truncated);
    }
    let hdr = setup_header_of(image)?;
    if hdr.version < MIN_PROTOCOL_FOR_PAYLOAD {
        return Err(Error::OldProtocol(hdr.version));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit);
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + hdr.payload_offset as usize;
    let end = start
        .checked_add(hdr.payload_length as usize)
        .ok_or(Error::BadPayload)?;
    image.get(start..end).ok_or(Error::BadPayload)
}

/// Decompresses the payload into the ELF vmlinux it holds.
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, Error> {
    let magic: [u8; 4] = payload
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .ok_or(Error::Truncated)?;
    let reader: Box<dyn Read + '_> = match magic {
        [0xfd, b'7', b'z', b'X'] => Box::new(liblzma::read::XzDecoder::new(payload)),
        [0x1f, 0x8b, _, _] => Box::new(flate2::read::GzDecoder::new(payload)),
        other => return Err(Error::UnsupportedCompression(other)),
    };
    let mut out = Vec::with_capacity(payload.len() * 5);
    // One byte more than the limit tells a too-large payload apart.
    reader
        .take(MAX_VMLINUX_SIZE + 1)
        .read_to_end(&mut out)
        .map_err(Error::Decompress)?;
    if out.len() as u64 > MAX_VMLINUX_SIZE {
        return Err(Error::TooLarge);
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(Error::NotElf);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal bzImage: header fields set, payload = gzip(ELF-ish bytes).
    fn fake_bzimage(payload: &[u8], version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 16]);
        img.extend_from_slice(payload);
        img.extend_from_slice(&[1, 2, 3, 4]); // trailing size field
        img
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn extracts_a_gzip_payload() {
        let elf = b"\x7fELF-pretend-kernel".repeat(100);
        let img = fake_bzimage(&gzip(&elf), 0x020f, XLF_KERNEL_64);
        assert!(is_bzimage(&img));
        assert_eq!(decompress(payload(&img).unwrap()).unwrap(), elf);
    }

    #[test]
    fn extracts_an_xz_payload() {
        let elf = b"\x7fELF-pretend-kernel".repeat(100);
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(&elf[..], 1)
            .read_to_end(&mut xz)
            .unwrap();
        let img = fake_bzimage(&xz, 0x020f, XLF_KERNEL_64);
        assert_eq!(decompress(payload(&img).unwrap()).unwrap(), elf);
    }

    #[test]
    fn refuses_bad_images() {
        let img = fake_bzimage(&gzip(b"\x7fELF"), 0x0206, XLF_KERNEL_64);
        assert!(matches!(payload(&img), Err(Error::OldProtocol(0x0206))));
        let img = fake_bzimage(&gzip(b"\x7fELF"), 0x020f, 0);
        assert!(matches!(payload(&img), Err(Error::Not64Bit)));
        let mut img = fake_bzimage(&gzip(b"\x7fELF"), 0x020f, XLF_KERNEL_64);
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(payload(&img), Err(Error::BadPayload)));
        assert!(matches!(
            decompress(b"BZh9 not supported"),
            Err(Error::UnsupportedCompression(_))
        ));
        assert!(matches!(
            decompress(&gzip(b"MZ not elf")),
            Err(Error::NotElf)
        ));
        assert!(matches!(
            decompress(&[0x1f, 0x8b, 0, 0, 1, 2]),
            Err(Error::Decompress(_))
        ));
    }
}
