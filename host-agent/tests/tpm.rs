//! The TPM layer against a real swtpm: identity, quotes checked by
//! tpm2-tools' `tpm2_checkquote`, PCR extends, sealing to PCR policies
//! across a reboot.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::swtpm::Swtpm;
use kiln_agent::tpm::{pcr_policy_digest, AkBlobs, Quote, SealedBlob, Tpm, TpmError};
use sha2::{Digest, Sha256};
use tss_esapi::structures::{Attest, AttestInfo, Public, PublicBuffer};
use tss_esapi::traits::UnMarshall;

fn open(t: &Swtpm) -> Tpm {
    Tpm::open(Some(&t.tcti())).expect("open swtpm")
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn extended(old: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(digest);
    h.finalize().into()
}

/// Asserts that no transient object or session is left in the TPM.
fn assert_nothing_loaded(tpm: &Tpm) {
    assert_eq!(tpm.loaded_handles().unwrap(), 0, "handles left in the TPM");
}

/// Writes the quote's parts where `tpm2_checkquote` reads them and runs it.
///
/// The PCR values go in as a "values" file (no selection header, as
/// `tpm2_pcrread -o` writes it) read with `-l`; tpm2-tools 5.4 cannot read
/// such a file for more than 8 PCRs (not even one `tpm2_quote -F values`
/// wrote: "Failed to hash PCR values related to quote"), so for more the
/// PCR digest in the signed TPMS_ATTEST is compared here instead.
fn checkquote(dir: &Path, q: &Quote, nonce: &[u8], pcrs: &[u8]) -> Result<(), String> {
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p.display().to_string()
    };
    let ak = write("ak.pub", &q.ak_public);
    let msg = write("quote.msg", &q.attest);
    let sig = write("quote.sig", &q.signature);
    let mut cmd = Command::new("tpm2_checkquote");
    cmd.args(["-u", &ak, "-m", &msg, "-s", &sig, "-g", "sha256"])
        .args(["-q", &hex::encode(nonce)]);
    if pcrs.len() <= 8 {
        let values: Vec<u8> = q.pcrs.values().flatten().copied().collect();
        let list = format!(
            "sha256:{}",
            pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
        );
        cmd.args(["-f", &write("quote.pcrs", &values), "-l", &list]);
    } else {
        let attest = Attest::unmarshall(&q.attest).map_err(|e| e.to_string())?;
        let AttestInfo::Quote { info } = attest.attested() else {
            return Err("not a quote".into());
        };
        let digest = kiln_agent::tpm::pcr_values_digest(pcrs, &q.pcrs).unwrap();
        if info.pcr_digest().value() != digest {
            return Err("the PCR values do not match the quote's PCR digest".into());
        }
    }
    let out = cmd.output().expect("run tpm2_checkquote");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn open_says_clearly_where_there_is_no_tpm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let e = Tpm::open(Some(&tcti)).unwrap_err();
    assert!(matches!(e, TpmError::NotFound { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(&format!("no TPM at {tcti}")),
        "{e}"
    );

    let e = Tpm::open(Some("device:/dev/kiln-no-such-tpm")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("no TPM at device:/dev/kiln-no-such-tpm"),
        "{e}"
    );
    let e = Tpm::open(Some("carrier-pigeon")).unwrap_err();
    assert!(matches!(e, TpmError::BadTcti(_)), "{e:?}");
}

#[test]
fn identity_has_the_ek_certificate_and_a_restricted_signing_ak() {
    let Some(t) = Swtpm::start_with_ek_cert() else {
        return;
    };
    let tpm = open(&t);
    let id = tpm.create_identity().unwrap();
    assert_nothing_loaded(&tpm);
    let cert = id
        .ek_cert_der
        .as_ref()
        .expect("swtpm_setup made a certificate");
    assert_eq!(cert[0], 0x30, "a DER SEQUENCE");
    assert!(id.ek_public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert!(id.ak_public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert_ne!(id.ek_public_pem, id.ak_public_pem);

    let public = Public::try_from(PublicBuffer::unmarshall(&id.ak.public).unwrap()).unwrap();
    let Public::Rsa {
        object_attributes: a,
        ..
    } = &public
    else {
        panic!("the AK is RSA: {public:?}");
    };
    assert!(a.restricted() && a.sign_encrypt() && !a.decrypt(), "{a:?}");
    assert!(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin());
    assert_eq!(id.ak_name.len(), 34);
    assert_eq!(id.ak_name[..2], [0x00, 0x0b]);

    // A second identity: the same EK (from the seed), another AK.
    let again = tpm.create_identity().unwrap();
    assert_eq!(again.ek_public_pem, id.ek_public_pem);
    assert_eq!(again.ek_cert_der, id.ek_cert_der);
    assert_ne!(again.ak, id.ak);
    // The AK loads under the persisted EK and quotes.
    let dir = tempfile::tempdir().unwrap();
    let q = tpm.quote(&id.ak, b"nonce", &[0, 23]).unwrap();
    checkquote(dir.path(), &q, b"nonce", &[0, 23]).unwrap();
    assert_nothing_loaded(&tpm);
    drop(tpm);

    // The same EK as swtpm_setup persisted at 0x81010001, and the same
    // certificate as tpm2-tools reads.
    let pem = dir.path().join("ek.pem");
    t.tool(
        "tpm2_readpublic",
        &["-c", "0x81010001", "-f", "pem", "-o", pem.to_str().unwrap()],
    );
    let want = std::fs::read_to_string(&pem).unwrap();
    assert_eq!(id.ek_public_pem.trim(), want.trim());
    let nv = t.tool("tpm2_nvread", &["0x01c00002"]);
    assert_eq!(&nv, cert);
}

#[test]
fn a_tpm_without_an_ek_certificate_gives_none() {
    let Some(t) = Swtpm::start() else {
        return;
    };
    let tpm = open(&t);
    let id = tpm.create_identity().unwrap();
    assert!(id.ek_cert_der.is_none());
    assert_nothing_loaded(&tpm);
    drop(tpm);

    // Another key persisted where the EK belongs is not taken for the EK.
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("other.ctx");
    let ctx = ctx.to_str().unwrap();
    t.tool("tpm2_createprimary", &["-C", "e", "-G", "ecc", "-c", ctx]);
    t.tool("tpm2_evictcontrol", &["-C", "o", "-c", ctx, "0x81010001"]);
    // No resource manager on swtpm's socket: unload what tpm2-tools left.
    t.tool("tpm2_flushcontext", &["-t"]);
    let tpm = open(&t);
    let again = tpm.create_identity().unwrap();
    assert_eq!(again.ek_public_pem, id.ek_public_pem);
    let q = tpm.quote(&id.ak, b"nonce", &[0]).unwrap();
    checkquote(dir.path(), &q, b"nonce", &[0]).unwrap();
    assert_nothing_loaded(&tpm);
}

#[test]
fn a_software_tpm_says_so_and_pcr_extend_makes_sha256_of_old_and_digest() {
    let Some(t) = Swtpm::start() else {
        return;
    };
    let tpm = open(&t);
    let info = tpm.info().unwrap();
    assert_eq!(info.manufacturer, "IBM", "{info:?}");
    assert!(info.software, "swtpm is a software TPM: {info:?}");
    let before = tpm.pcr_read(&[16, 23]).unwrap();
    assert_eq!(before, BTreeMap::from([(16, [0; 32]), (23, [0; 32])]));
    let d = sha(b"kiln-vmm launch");
    tpm.pcr_extend(16, &d).unwrap();
    let after = tpm.pcr_read(&[16, 23]).unwrap();
    assert_eq!(after[&16], extended(&[0; 32], &d));
    assert_eq!(after[&23], [0; 32], "other PCRs untouched");
    tpm.pcr_extend(16, &d).unwrap();
    assert_eq!(tpm.pcr_read(&[16]).unwrap()[&16], extended(&after[&16], &d));

    // More PCRs than one TPM2_PCR_Read returns (8).
    let all: Vec<u8> = (0..24).collect();
    assert_eq!(tpm.pcr_read(&all).unwrap().len(), 24);
    assert!(matches!(tpm.pcr_extend(24, &d), Err(TpmError::Invalid(_))));
    assert!(matches!(tpm.pcr_read(&[3, 3]), Err(TpmError::Invalid(_))));
    assert_nothing_loaded(&tpm);
}

#[test]
fn a_quote_verifies_with_tpm2_checkquote_and_only_with_its_nonce() {
    let Some(t) = Swtpm::start() else {
        return;
    };
    let tpm = open(&t);
    let id = tpm.create_identity().unwrap();
    tpm.pcr_extend(16, &sha(b"a measurement")).unwrap();
    let nonce = rand::random::<[u8; 32]>();
    let pcrs = [0, 10, 16, 23];
    let q = tpm.quote(&id.ak, &nonce, &pcrs).unwrap();
    assert_nothing_loaded(&tpm);
    assert_eq!(q.pcrs, tpm.pcr_read(&pcrs).unwrap());
    assert_eq!(q.ak_public, id.ak.public);

    let dir = tempfile::tempdir().unwrap();
    checkquote(dir.path(), &q, &nonce, &pcrs).expect("tpm2_checkquote accepts the quote");
    let other = rand::random::<[u8; 32]>();
    let e = checkquote(dir.path(), &q, &other, &pcrs).expect_err("another nonce");
    assert!(
        e.contains("qualif") || e.contains("nonce") || e.contains("extra"),
        "{e}"
    );
    let mut forged = q.clone();
    forged.pcrs.insert(16, [0; 32]);
    checkquote(dir.path(), &forged, &nonce, &pcrs).expect_err("changed PCR values");
    let mut forged = q.clone();
    *forged.attest.last_mut().unwrap() ^= 1;
    checkquote(dir.path(), &forged, &nonce, &pcrs).expect_err("changed quote");

    // More PCRs than one TPM2_PCR_Read returns, across the bitmap's octets.
    let many = [0, 1, 2, 3, 4, 5, 6, 7, 10, 14, 15, 16, 23];
    let q = tpm.quote(&id.ak, &nonce, &many).unwrap();
    assert_eq!(q.pcrs.len(), many.len());
    checkquote(dir.path(), &q, &nonce, &many).unwrap();
    let mut forged = q.clone();
    forged.pcrs.insert(23, [1; 32]);
    checkquote(dir.path(), &forged, &nonce, &many).expect_err("changed PCR values");

    // The largest nonce goes through; one byte more is refused.
    let big = [7u8; 64];
    let q = tpm.quote(&id.ak, &big, &[23]).unwrap();
    checkquote(dir.path(), &q, &big, &[23]).unwrap();
    assert!(matches!(
        tpm.quote(&id.ak, &[7u8; 65], &[23]),
        Err(TpmError::Invalid(_))
    ));
    let mut bad = id.ak.clone();
    bad.private.truncate(10);
    assert!(matches!(
        tpm.quote(&bad, &nonce, &[23]),
        Err(TpmError::Blob { .. })
    ));
    assert_nothing_loaded(&tpm);
}

#[test]
fn a_secret_unseals_until_a_sealed_pcr_changes() {
    let Some(t) = Swtpm::start() else {
        return;
    };
    let tpm = open(&t);
    tpm.pcr_extend(16, &sha(b"boot")).unwrap();
    let pcrs = [16, 23];
    let now = tpm.pcr_read(&pcrs).unwrap();
    let secret = rand::random::<[u8; 32]>();
    let blob = tpm
        .seal(&secret, &pcrs, std::slice::from_ref(&now))
        .unwrap();
    assert_nothing_loaded(&tpm);
    let json = serde_json::to_string(&blob).unwrap();
    assert!(
        !json.contains(&hex::encode(secret)),
        "the blob holds no secret in the clear"
    );
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), secret);
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), secret, "again");
    assert_nothing_loaded(&tpm);

    tpm.pcr_extend(23, &sha(b"tampered")).unwrap();
    let e = tpm.unseal(&blob).unwrap_err();
    assert!(
        matches!(&e, TpmError::PolicyMismatch { changed } if changed == &[23]),
        "{e:?}"
    );
    assert!(e.to_string().contains("measurements changed"), "{e}");
    assert_nothing_loaded(&tpm);

    // Sealed to more PCRs than one TPM2_PCR_Read returns, two branches.
    let many = [0, 1, 2, 3, 4, 5, 6, 7, 14];
    let now = tpm.pcr_read(&many).unwrap();
    let mut next = now.clone();
    next.insert(14, extended(&[0; 32], &sha(b"next")));
    let b = tpm.seal(&secret, &many, &[now, next]).unwrap();
    assert_eq!(tpm.unseal(&b).unwrap().as_slice(), secret);
    tpm.pcr_extend(14, &sha(b"next")).unwrap();
    assert_eq!(tpm.unseal(&b).unwrap().as_slice(), secret);
    tpm.pcr_extend(7, &sha(b"other")).unwrap();
    assert!(matches!(
        tpm.unseal(&b),
        Err(TpmError::PolicyMismatch { ref changed }) if changed == &[7]
    ));

    // Secrets of 1 and 128 bytes; empty and 129 refused.
    for len in [1, 128] {
        let s = vec![0x5a; len];
        let now = tpm.pcr_read(&[16]).unwrap();
        let b = tpm.seal(&s, &[16], &[now]).unwrap();
        assert_eq!(tpm.unseal(&b).unwrap().as_slice(), s);
    }
    let now = tpm.pcr_read(&[16]).unwrap();
    for len in [0, 129] {
        assert!(matches!(
            tpm.seal(&vec![1; len], &[16], std::slice::from_ref(&now)),
            Err(TpmError::Invalid(_))
        ));
    }
    // Branches must name exactly the sealed PCRs.
    assert!(matches!(
        tpm.seal(&secret, &[16, 23], &[now]),
        Err(TpmError::Invalid(_))
    ));
    assert_nothing_loaded(&tpm);
}

#[test]
fn a_two_branch_policy_unseals_before_and_after_a_reboot_to_predicted_values() {
    let Some(mut t) = Swtpm::start() else {
        return;
    };
    let pcrs = [16, 23];
    let old_agent = sha(b"kiln-agent v1");
    let new_agent = sha(b"kiln-agent v2");
    let tpm = open(&t);
    tpm.pcr_extend(16, &old_agent).unwrap();
    let now = tpm.pcr_read(&pcrs).unwrap();
    // After the update the node boots and measures v2 instead of v1.
    let predicted = BTreeMap::from([(16, extended(&[0; 32], &new_agent)), (23, [0; 32])]);
    assert_ne!(
        pcr_policy_digest(&pcrs, &now).unwrap(),
        pcr_policy_digest(&pcrs, &predicted).unwrap()
    );
    let secret = b"the node's key-encryption key....".to_vec();
    let blob = tpm.seal(&secret, &pcrs, &[now, predicted]).unwrap();
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), secret);
    assert_nothing_loaded(&tpm);
    drop(tpm);

    t.reboot();
    let tpm = open(&t);
    assert_eq!(tpm.pcr_read(&[16]).unwrap()[&16], [0; 32], "PCRs reset");
    // Nothing measured yet: neither branch holds.
    assert!(matches!(
        tpm.unseal(&blob),
        Err(TpmError::PolicyMismatch { ref changed }) if changed == &[16]
    ));
    tpm.pcr_extend(16, &new_agent).unwrap();
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), secret);
    // A third state is in neither branch.
    tpm.pcr_extend(16, &new_agent).unwrap();
    assert!(matches!(
        tpm.unseal(&blob),
        Err(TpmError::PolicyMismatch { .. })
    ));
    assert_nothing_loaded(&tpm);
}

#[test]
fn stored_ak_and_sealed_blobs_work_after_a_restart() {
    let Some(mut t) = Swtpm::start() else {
        return;
    };
    let tpm = open(&t);
    let id = tpm.create_identity().unwrap();
    let zero = tpm.pcr_read(&[23]).unwrap();
    let sealed = tpm.seal(b"kek", &[23], &[zero]).unwrap();
    let stored = (
        serde_json::to_string(&id.ak).unwrap(),
        serde_json::to_string(&sealed).unwrap(),
    );
    drop(tpm);

    t.reboot();
    let tpm = open(&t);
    let ak: AkBlobs = serde_json::from_str(&stored.0).unwrap();
    let sealed: SealedBlob = serde_json::from_str(&stored.1).unwrap();
    assert_eq!(tpm.unseal(&sealed).unwrap().as_slice(), b"kek");
    let nonce = b"after restart";
    let q = tpm.quote(&ak, nonce, &[0, 23]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    checkquote(dir.path(), &q, nonce, &[0, 23]).unwrap();
    // The EK comes back the same from the endorsement seed.
    assert_eq!(
        tpm.create_identity().unwrap().ek_public_pem,
        id.ek_public_pem
    );
    assert_nothing_loaded(&tpm);
}

/// A recording TCP relay between the TPM client and swtpm, on a port pair
/// like swtpm's (command, control).
struct Tap {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Tap {
    fn start(swtpm_port: u16) -> Tap {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let (port, listeners) = loop {
            let a = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = a.local_addr().unwrap().port();
            if let Ok(b) = TcpListener::bind(("127.0.0.1", port.wrapping_add(1))) {
                break (port, [(a, swtpm_port), (b, swtpm_port + 1)]);
            }
        };
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for (listener, target) in listeners {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    let server = TcpStream::connect(("127.0.0.1", target)).unwrap();
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        let seen = seen.clone();
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n @ 1..) = from.read(&mut buf) {
                                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            });
        }
        Tap { port, seen }
    }

    fn saw(&self, needle: &[u8]) -> bool {
        self.seen
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }
}

#[test]
fn a_sealed_secret_never_crosses_the_wire_in_the_clear() {
    let Some(t) = Swtpm::start() else {
        return;
    };
    let tap = Tap::start(t.port());
    let tpm = Tpm::open(Some(&format!("swtpm:host=127.0.0.1,port={}", tap.port))).unwrap();
    let now = tpm.pcr_read(&[23]).unwrap();
    let secret = rand::random::<[u8; 32]>();
    let blob = tpm
        .seal(&secret, &[23], std::slice::from_ref(&now))
        .unwrap();
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), secret);
    // The tap sees the traffic: the policy travels in the clear.
    let policy = pcr_policy_digest(&[23], &now).unwrap();
    assert!(tap.saw(&policy), "the tap saw no TPM traffic");
    assert!(
        !tap.saw(&secret),
        "the secret crossed the wire in the clear"
    );
    assert!(
        !tap.saw(&secret[..16]),
        "half the secret crossed the wire in the clear"
    );
}
