//! Who may take part in a migration: the unix peer's uid, and on TCP a
//! shared secret proven both ways before anything else.
//!
//! Handshake (every connection, unix included, so that a stray client is
//! recognised at once): the source sends `magic | mode | nonce_s`; the
//! destination answers `magic | mode | nonce_d | proof_d`; with a secret
//! the source checks `proof_d = HMAC(secret, "...destination proof" |
//! nonce_s | nonce_d)`, sends `proof_s = HMAC(secret, "...source proof" |
//! nonce_s | nonce_d)`, and the destination checks it and sends the byte
//! `1`. Both nonces are 32 fresh random bytes; the labels differ so that a
//! proof cannot be reflected. This authenticates the peer when it
//! connects; the traffic after it is not encrypted (see
//! [`super::transport`]).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::transport::{io_error, read_exact_or_closed, Connection, TransportError};

/// Handshake magic (7 bytes) and handshake version (1 byte).
const MAGIC: &[u8; 8] = b"KILNMIG\x01";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const MODE_OPEN: u8 = 0;
const MODE_SECRET: u8 = 1;
const LABEL_DESTINATION: &[u8] = b"kiln-migration v1 destination proof";
const LABEL_SOURCE: &[u8] = b"kiln-migration v1 source proof";

/// A 256-bit shared secret. Never printed.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Secret(bytes)
    }

    /// Reads a secret file: 32 raw bytes, or 64 hex digits (a trailing
    /// newline allowed). The file must not be accessible to group or
    /// others (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Self, TransportError> {
        let err = |reason: String| TransportError::Secret {
            path: path.to_owned(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(err(format!(
                "group or others may access it (mode {:o}); make it 0600",
                meta.mode() & 0o777
            )));
        }
        let mut data = Vec::with_capacity(128);
        (&mut file)
            .take(129)
            .read_to_end(&mut data)
            .map_err(|e| err(e.to_string()))?;
        let parsed = parse_key(&data);
        wipe(&mut data);
        parsed
            .map(Secret)
            .ok_or_else(|| err("expected 32 raw bytes or 64 hex digits (a 256-bit secret)".into()))
    }

    fn mac(&self, label: &[u8], nonce_src: &[u8], nonce_dst: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(label);
        mac.update(nonce_src);
        mac.update(nonce_dst);
        mac
    }
}

/// 32 raw bytes, or 64 hex digits and an optional newline.
fn parse_key(data: &[u8]) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    if data.len() == 32 {
        key.copy_from_slice(data);
        return Some(key);
    }
    let text = data.strip_suffix(b"\n").unwrap_or(data);
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    for (k, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
        *k = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(key)
}

fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference; the
        // volatile write only keeps the compiler from eliding the wipe.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

pub(super) fn check_peer_cred(fd: RawFd) -> Result<(), TransportError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the
    // size of `cred`; `fd` is a connected unix socket we own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(TransportError::Io {
            what: "SO_PEERCRED".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let own = unsafe { libc::geteuid() };
    if cred.uid == own || cred.uid == 0 {
        Ok(())
    } else {
        Err(TransportError::PeerNotAllowed {
            uid: cred.uid,
            pid: cred.pid,
            own,
        })
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], TransportError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n)
        .map_err(|e| TransportError::Auth(format!("no random nonce: {e}")))?;
    Ok(n)
}

fn mode_name(mode: u8) -> &'static str {
    match mode {
        MODE_OPEN => "no shared secret",
        MODE_SECRET => "a shared secret",
        _ => "an unknown mode",
    }
}

fn hs_read(conn: &mut Connection, buf: &mut [u8], step: &str) -> Result<(), TransportError> {
    let t = conn.timeout;
    let peer = conn.peer.clone();
    read_exact_or_closed(&mut conn.stream, buf, t, || {
        format!("{peer} during the handshake ({step})")
    })
}

fn hs_write(conn: &mut Connection, buf: &[u8], step: &str) -> Result<(), TransportError> {
    let t = conn.timeout;
    conn.stream
        .write_all(buf)
        .map_err(|e| io_error(format!("{} during the handshake ({step})", conn.peer), e, t))
}

/// Our greeting, `magic | mode | nonce` (a fresh random nonce with a
/// secret, zeros without), with its mode and nonce.
fn greeting(secret: Option<&Secret>) -> Result<(u8, [u8; NONCE_LEN], Vec<u8>), TransportError> {
    let (mode, nonce) = match secret {
        Some(_) => (MODE_SECRET, nonce()?),
        None => (MODE_OPEN, [0; NONCE_LEN]),
    };
    let mut g = Vec::with_capacity(8 + 1 + NONCE_LEN + MAC_LEN);
    g.extend_from_slice(MAGIC);
    g.push(mode);
    g.extend_from_slice(&nonce);
    Ok((mode, nonce, g))
}

/// Checks that the peer's greeting (`them`: "source" or "destination")
/// starts with our magic.
fn check_magic(conn: &Connection, theirs: &[u8], them: &str) -> Result<(), TransportError> {
    if &theirs[..8] != MAGIC {
        return Err(TransportError::Auth(format!(
            "{} is not a kiln-vmm migration {them} (or a different handshake version)",
            conn.peer
        )));
    }
    Ok(())
}

/// Checks that the peer (`them`) uses our mode (`us`: what we are).
fn check_mode(theirs: u8, ours: u8, them: &str, us: &str) -> Result<(), TransportError> {
    if theirs != ours {
        return Err(TransportError::Auth(format!(
            "the {them} uses {}, this {us} {}",
            mode_name(theirs),
            mode_name(ours)
        )));
    }
    Ok(())
}

/// Source side: `magic | mode | nonce_s` → `magic | mode | nonce_d |
/// proof_d` → `proof_s` → `ok`.
pub(super) fn client_handshake(
    conn: &mut Connection,
    secret: Option<&Secret>,
) -> Result<(), TransportError> {
    let (mode, nonce_s, hello) = greeting(secret)?;
    hs_write(conn, &hello, "greeting")?;
    let mut answer = [0u8; 8 + 1 + NONCE_LEN + MAC_LEN];
    hs_read(conn, &mut answer, "waiting for the destination's greeting")?;
    check_magic(conn, &answer, "destination")?;
    check_mode(answer[8], mode, "destination", "source")?;
    let Some(secret) = secret else {
        return Ok(());
    };
    let nonce_d = &answer[9..9 + NONCE_LEN];
    let proof_d = &answer[9 + NONCE_LEN..];
    secret
        .mac(LABEL_DESTINATION, &nonce_s, nonce_d)
        .verify_slice(proof_d)
        .map_err(|_| {
            TransportError::Auth("the destination does not know the shared secret".into())
        })?;
    let proof_s = secret
        .mac(LABEL_SOURCE, &nonce_s, nonce_d)
        .finalize()
        .into_bytes();
    hs_write(conn, &proof_s, "proof")?;
    let mut ok = [0u8; 1];
    hs_read(
        conn,
        &mut ok,
        "waiting for the destination to accept our proof",
    )
    .map_err(|e| match e {
        TransportError::Closed { .. } => TransportError::Auth(
            "the destination refused our proof of the shared secret (a different secret?)".into(),
        ),
        e => e,
    })?;
    if ok[0] != 1 {
        return Err(TransportError::Auth(
            "the destination refused our proof".into(),
        ));
    }
    Ok(())
}

pub(super) fn server_handshake(
    conn: &mut Connection,
    secret: Option<&Secret>,
) -> Result<(), TransportError> {
    let mut hello = [0u8; 8 + 1 + NONCE_LEN];
    hs_read(conn, &mut hello, "waiting for the source's greeting")?;
    check_magic(conn, &hello, "source")?;
    let nonce_s = &hello[9..];
    let (mode, nonce_d, mut answer) = greeting(secret)?;
    match (secret, hello[8] == mode) {
        (Some(secret), true) => {
            let proof = secret.mac(LABEL_DESTINATION, nonce_s, &nonce_d).finalize();
            answer.extend_from_slice(&proof.into_bytes());
        }
        _ => answer.extend_from_slice(&[0; MAC_LEN]),
    }
    hs_write(conn, &answer, "greeting")?;
    check_mode(hello[8], mode, "source", "destination")?;
    let Some(secret) = secret else {
        return Ok(());
    };
    let mut proof_s = [0u8; MAC_LEN];
    hs_read(conn, &mut proof_s, "waiting for the source's proof").map_err(|e| match e {
        TransportError::Closed { .. } => TransportError::Auth(
            "the source refused our proof of the shared secret (a different secret?)".into(),
        ),
        e => e,
    })?;
    secret
        .mac(LABEL_SOURCE, nonce_s, &nonce_d)
        .verify_slice(&proof_s)
        .map_err(|_| TransportError::Auth("the source does not know the shared secret".into()))?;
    hs_write(conn, &[1], "accepting the proof")
}
