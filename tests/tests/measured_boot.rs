//! Measured boot (issue 14, section 2): the test host with a TPM 2.0
//! (swtpm as a `tpm-tis` device) and IMA.
//!
//! Boot 1 (`scripts/testhost --tpm DIR --ima`): a configuration file of
//! Kiln's group is read, a probe program and tpm2-tools run, a persistent
//! key is made; the script prints the SHA-256 PCRs (tpm2-tools and sysfs)
//! and hex dumps of the firmware's event log and IMA's log. Here the logs
//! are replayed and must give the PCR values: PCRs 0-7 from the firmware
//! (SeaBIOS) log, PCR 10 from IMA's, whose `boot_aggregate` must cover PCRs
//! 0-9; the probe, the configuration file and tpm2-tools must be in IMA's
//! log with the SHA-256 of the files copied in.
//!
//! Boot 2 (the Rust [`Swtpm`] on the same state: the same machine
//! rebooted): PCR 10 starts over (its log alone replays to it), PCRs 0-7
//! are as in boot 1, the persistent key is still there.
//!
//! Also, on this machine: swtpm over TCP (the mode for tss-esapi tests)
//! resets its PCRs on `reboot()` and keeps its keys.
//!
//! The log parsing and replay here is deliberately minimal and test-only
//! (SHA-256 bank only, ima-ng only); Kiln's verifier has its own parser in
//! host-agent/src/attest/. Hashes come from `sha256sum`, so this crate needs
//! no crypto dependency.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_tests::{require_testhost, skip, target_dir, HostRun, Manufacture, Swtpm, TestHost};

/// The group whose files IMA measures as Kiln configuration (`fgroup=` in
/// scripts/lib/ima-policy; scripts/testhost gives it to files under
/// /etc/kiln).
const KILN_CONFIG_GID: u32 = 4190;
/// A persistent key handle (owner hierarchy) the test makes in boot 1.
const KEY_HANDLE: &str = "0x81000010";

type Digest = [u8; 32];

// ------------------------------------------------------------------ helpers

fn sha256(data: &[u8]) -> Digest {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    unhex(text.split_whitespace().next().unwrap())
        .try_into()
        .unwrap()
}

/// PCR extend: new = SHA-256(old || digest).
fn extend(pcr: &mut Digest, digest: &Digest) {
    let mut buf = pcr.to_vec();
    buf.extend_from_slice(digest);
    *pcr = sha256(&buf);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    assert!(s.len().is_multiple_of(2), "odd hex: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("bad hex {s}")))
        .collect()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.0.len() >= n, "event log truncated");
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

// ------------------------------------------------------------------ firmware log

const TPM_ALG_SHA256: u16 = 0x000b;
const EV_NO_ACTION: u32 = 0x3;

/// One TCG_PCR_EVENT2 record (SHA-256 digest only).
#[derive(Debug)]
struct FwEvent {
    pcr: u32,
    typ: u32,
    sha256: Option<Digest>,
    data: Vec<u8>,
}

/// Replays a TCG2 crypto-agile event log (TCG PC Client Platform Firmware
/// Profile: a SHA-1-format Spec ID event, then TCG_PCR_EVENT2 records) into
/// the SHA-256 bank. Returns PCR index -> value for every PCR the log
/// touches, and the events.
fn replay_firmware_log(log: &[u8]) -> (BTreeMap<u32, Digest>, Vec<FwEvent>) {
    let mut r = Reader(log);
    // TCG_PCR_EVENT: pcrIndex, eventType, SHA-1 digest, eventSize, event.
    let _pcr = r.u32();
    let typ = r.u32();
    assert_eq!(typ, EV_NO_ACTION, "first event is not the Spec ID event");
    r.take(20);
    let size = r.u32() as usize;
    let mut spec = Reader(r.take(size));
    let sig = spec.take(16);
    assert_eq!(
        sig, b"Spec ID Event03\0",
        "not a crypto-agile (TCG2) event log"
    );
    spec.take(4 + 4); // platformClass, version minor/major, errata, uintnSize
    let n_algs = spec.u32();
    let mut sizes = BTreeMap::new();
    for _ in 0..n_algs {
        let alg = spec.u16();
        let len = spec.u16();
        sizes.insert(alg, len as usize);
    }
    assert!(
        sizes.contains_key(&TPM_ALG_SHA256),
        "event log without SHA-256"
    );

    let mut pcrs: BTreeMap<u32, Digest> = BTreeMap::new();
    let mut events = Vec::new();
    while !r.done() {
        let pcr = r.u32();
        let typ = r.u32();
        let count = r.u32();
        let mut d256 = None;
        for _ in 0..count {
            let alg = r.u16();
            let len = *sizes
                .get(&alg)
                .unwrap_or_else(|| panic!("digest of unknown algorithm {alg:#x}"));
            let d = r.take(len);
            if alg == TPM_ALG_SHA256 {
                d256 = Some(<Digest>::try_from(d).unwrap());
            }
        }
        let size = r.u32() as usize;
        let data = r.take(size);
        events.push(FwEvent {
            pcr,
            typ,
            sha256: d256,
            data: data.to_vec(),
        });
        if typ == EV_NO_ACTION {
            // Not extended. A StartupLocality event sets PCR 0's start
            // value to the locality (its last byte).
            if data.starts_with(b"StartupLocality\0") && data.len() >= 17 {
                let mut v = [0u8; 32];
                v[31] = data[16];
                pcrs.insert(0, v);
            }
            continue;
        }
        let d = d256.expect("event without a SHA-256 digest");
        extend(pcrs.entry(pcr).or_insert([0; 32]), &d);
    }
    (pcrs, events)
}

// ------------------------------------------------------------------ IMA log

/// One record of IMA's `binary_runtime_measurements` (ima-ng template).
#[derive(Debug)]
struct ImaEntry {
    pcr: u32,
    /// The log's template digest (SHA-1; all zeros for a violation).
    template_sha1: [u8; 20],
    template: String,
    /// The template data as hashed into the PCR banks.
    data: Vec<u8>,
    /// ima-ng `d-ng`: "sha256" and the file digest.
    algo: String,
    file_digest: Vec<u8>,
    /// ima-ng `n-ng`: the path (or "boot_aggregate").
    name: String,
}

fn parse_ima_log(log: &[u8]) -> Vec<ImaEntry> {
    let mut r = Reader(log);
    let mut out = Vec::new();
    while !r.done() {
        let pcr = r.u32();
        let template_sha1: [u8; 20] = r.take(20).try_into().unwrap();
        let len = r.u32() as usize;
        let template = String::from_utf8(r.take(len).to_vec()).unwrap();
        assert_eq!(
            template, "ima-ng",
            "this test boots with ima_template=ima-ng"
        );
        let len = r.u32() as usize;
        let data = r.take(len).to_vec();
        // Fields: u32 length + bytes each. d-ng = "algo:\0" + digest;
        // n-ng = path + "\0".
        let mut f = Reader(&data);
        let len = f.u32() as usize;
        let dng = f.take(len);
        let colon = dng.iter().position(|&b| b == b':').expect("d-ng algo");
        let algo = String::from_utf8(dng[..colon].to_vec()).unwrap();
        let file_digest = dng[colon + 2..].to_vec(); // skip ":\0"
        let len = f.u32() as usize;
        let nng = f.take(len);
        let name = String::from_utf8_lossy(nng.strip_suffix(&[0]).unwrap_or(nng)).into_owned();
        assert!(f.done(), "ima-ng entry with more than two fields");
        out.push(ImaEntry {
            pcr,
            template_sha1,
            template,
            data,
            algo,
            file_digest,
            name,
        });
    }
    out
}

/// The SHA-256 bank's PCR 10 after each entry of the log (from zero).
/// Linux extends every bank with that bank's hash of the template data; a
/// violation (SHA-1 digest logged as zeros) is extended as all 0xff.
fn replay_ima(entries: &[ImaEntry]) -> Vec<Digest> {
    let mut pcr = [0u8; 32];
    entries
        .iter()
        .map(|e| {
            assert_eq!(e.pcr, 10, "IMA entry for PCR {}", e.pcr);
            let d = if e.template_sha1 == [0; 20] {
                [0xff; 32]
            } else {
                sha256(&e.data)
            };
            extend(&mut pcr, &d);
            pcr
        })
        .collect()
}

// ------------------------------------------------------------------ console

/// The bytes dumped with `dump NAME FILE` in [`SCRIPT_LIB`].
fn hex_block(run: &HostRun, name: &str) -> Option<Vec<u8>> {
    let tag = format!("MB-HEX {name} ");
    let end = run.line_with(&format!("MB-HEX-END {name} "))?;
    let bytes: usize = kiln_tests::field(end, "bytes")?.parse().ok()?;
    let text: String = run
        .lines_with(&tag)
        .iter()
        .map(|l| l[tag.len()..].trim())
        .collect();
    let data = unhex(&text);
    assert_eq!(data.len(), bytes, "{name}: console lost part of the dump");
    Some(data)
}

/// `tpm2 pcrread` output (`  0 : 0xABCD...` under `sha256:`), prefixed.
fn parse_pcrread<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<u32, Digest> {
    lines
        .filter_map(|l| {
            let (idx, val) = l.split_once(':')?;
            let idx: u32 = idx.trim().parse().ok()?;
            let val = val.trim().strip_prefix("0x")?;
            Some((idx, unhex(&val.to_lowercase()).try_into().ok()?))
        })
        .collect()
}

struct Boot {
    pcrs: BTreeMap<u32, Digest>,
    bios: BTreeMap<u32, Digest>,
    bios_events: Vec<FwEvent>,
    ima: Vec<ImaEntry>,
    /// Name of the persistent key, if the script printed it.
    key_name: Option<String>,
}

/// Checks what every boot must show and returns its parts.
fn check_boot(run: &HostRun, what: &str) -> Boot {
    run.assert_success();
    assert!(
        run.line_with("KILN-IMA-POLICY loaded").is_some(),
        "{what}: the IMA policy was not loaded\n{}",
        run.output
    );
    let end = run.line_with("MB-PCRREAD-END").expect("pcrread ran");
    assert_eq!(
        kiln_tests::field(end, "rc"),
        Some("0"),
        "{what}: tpm2 pcrread failed:\n{}",
        run.output
    );
    let pcrs = parse_pcrread(
        run.lines_with("MB-PCRREAD ")
            .into_iter()
            .map(|l| &l["MB-PCRREAD ".len()..]),
    );
    assert_eq!(
        pcrs.len(),
        11,
        "{what}: PCRs 0-10 from tpm2 pcrread: {pcrs:?}"
    );
    // The kernel's own view (sysfs, Linux >= 5.12) agrees with tpm2-tools.
    for l in run.lines_with("MB-SYSFS-PCR ") {
        let mut w = l.split_whitespace().skip(1);
        let idx: u32 = w.next().unwrap().parse().unwrap();
        let val = unhex(&w.next().unwrap_or("").to_lowercase());
        assert_eq!(
            val, pcrs[&idx],
            "{what}: PCR {idx}: sysfs and tpm2 pcrread differ"
        );
    }

    // Firmware log -> PCRs 0-9 (0-7: the firmware; 8-9: boot loader and
    // Linux's EFI stub, UEFI only; with SeaBIOS nothing touches 8 and 9).
    let bios_log = hex_block(run, "bios").unwrap_or_else(|| {
        panic!(
            "{what}: no firmware event log (binary_bios_measurements)\n{}",
            run.output
        )
    });
    let (bios, bios_events) = replay_firmware_log(&bios_log);
    for i in 0..10 {
        let replayed = bios.get(&i).copied().unwrap_or([0; 32]);
        assert_eq!(
            hex(&replayed),
            hex(&pcrs[&i]),
            "{what}: PCR {i} differs from the firmware log's replay"
        );
    }
    eprintln!(
        "{what}: firmware log {} bytes, {} events, PCRs {:?} extended",
        bios_log.len(),
        bios_events.len(),
        bios.keys().collect::<Vec<_>>()
    );

    // IMA log -> PCR 10.
    let ima_log = hex_block(run, "ima").expect("IMA log dumped");
    let ima = parse_ima_log(&ima_log);
    assert_eq!(ima[0].name, "boot_aggregate", "{what}: first IMA entry");
    assert!(ima.iter().all(|e| e.template == "ima-ng"));
    assert!(ima
        .iter()
        .all(|e| e.algo == "sha256" && e.file_digest.len() == 32));
    // boot_aggregate (SHA-256 bank): SHA-256 over PCRs 0-9.
    let mut cat = Vec::new();
    for i in 0..10 {
        cat.extend_from_slice(&pcrs[&i]);
    }
    assert_eq!(
        hex(&ima[0].file_digest),
        hex(&sha256(&cat)),
        "{what}: boot_aggregate is not SHA-256(PCR 0..9)"
    );
    // The PCRs were read before the log was dumped: PCR 10 is the replay of
    // the whole log or of a prefix (Keylime's rule); the script runs nothing
    // new in between, so it is in practice the whole log.
    let replay = replay_ima(&ima);
    let upto = replay
        .iter()
        .position(|v| *v == pcrs[&10])
        .unwrap_or_else(|| {
            panic!(
                "{what}: PCR 10 {} is no prefix replay of the IMA log ({} entries):\n{}",
                hex(&pcrs[&10]),
                ima.len(),
                ima.iter()
                    .map(|e| format!("  {} {}", hex(&e.file_digest), e.name))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    eprintln!(
        "{what}: IMA log {} bytes, {} entries; PCR 10 = replay of the first {}",
        ima_log.len(),
        ima.len(),
        upto + 1
    );
    let mut ima = ima;
    ima.truncate(upto + 1);

    let key_name = run
        .line_with("MB-KEY-NAME ")
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string);
    Boot {
        pcrs,
        bios,
        bios_events,
        ima,
        key_name,
    }
}

/// Shell functions for both boots' scripts.
const SCRIPT_LIB: &str = r#"#!/bin/sh
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
mount -t securityfs securityfs /sys/kernel/security || echo MB-NO-SECURITYFS
dump() { # NAME FILE: hex lines, then the size (to detect lost lines)
    if [ -r "$2" ]; then
        xxd -p "$2" | sed "s/^/MB-HEX $1 /"
        echo "MB-HEX-END $1 bytes=$(wc -c <"$2")"
    else
        echo "MB-HEX-MISSING $1"
    fi
}
pcrs() {
    tpm2 pcrread sha256:0,1,2,3,4,5,6,7,8,9,10 >/tmp/pcrs.txt 2>/tmp/pcrs.err
    rc=$?
    sed 's/^/MB-PCRREAD /' /tmp/pcrs.txt
    sed 's/^/MB-PCRREAD-ERR /' /tmp/pcrs.err
    echo "MB-PCRREAD-END rc=$rc"
    for i in 0 1 2 3 4 5 6 7 8 9 10; do
        echo "MB-SYSFS-PCR $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i)"
    done
}
key_name() {
    tpm2 readpublic -c $KEY -n /tmp/key.name >/dev/null && echo "MB-KEY-NAME $(xxd -p /tmp/key.name | tr -d '\n')"
}
logs() {
    dump bios /sys/kernel/security/tpm0/binary_bios_measurements
    dump ima /sys/kernel/security/ima/binary_runtime_measurements
}
"#;

fn boot1_script() -> String {
    format!(
        r#"{SCRIPT_LIB}KEY={KEY_HANDLE}
ls -l /dev/tpm0 /dev/tpmrm0
# Kiln configuration: measured because of its group, which scripts/testhost
# --ima gives the files it copies under /etc/kiln.
[ "$(stat -c %g /etc/kiln/kiln.toml)" = {KILN_CONFIG_GID} ] || echo MB-CONFIG-GROUP-WRONG
cat /etc/kiln/kiln.toml >/dev/null
kiln-mb-probe
# A persistent key in the owner hierarchy (again if this boot is rerun).
tpm2 evictcontrol -C o -c $KEY >/dev/null 2>&1
tpm2 createprimary -C o -G ecc -c /tmp/primary.ctx >/dev/null &&
    tpm2 evictcontrol -C o -c /tmp/primary.ctx $KEY >/dev/null && echo MB-KEY-MADE
key_name
pcrs
logs
"#
    )
}

fn boot2_script() -> String {
    format!("{SCRIPT_LIB}KEY={KEY_HANDLE}\nkey_name\npcrs\nlogs\n")
}

fn entry<'a>(b: &'a Boot, path: &str) -> Option<&'a ImaEntry> {
    b.ima.iter().find(|e| e.name == path)
}

// ------------------------------------------------------------------ tests

#[test]
fn measured_boot_in_the_test_host() {
    if !require_testhost() || !Swtpm::available() {
        return;
    }
    let tpm2 = Path::new("/usr/bin/tpm2");
    if !tpm2.is_file() {
        skip("tpm2-tools not installed (apt-get install tpm2-tools)");
        return;
    }
    let dir = target_dir().join(format!("kiln-tests/measured-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("tpm");

    // A probe program whose digest no other file has, and a config file.
    let probe = dir.join("kiln-mb-probe");
    let nonce = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
    std::fs::write(&probe, format!("#!/bin/sh\necho MB-PROBE-RAN {nonce}\n")).unwrap();
    let config = dir.join("kiln.toml");
    std::fs::write(&config, format!("# measured-boot test {nonce}\n[agent]\n")).unwrap();
    let bins: Vec<PathBuf> = vec![probe.clone(), tpm2.to_path_buf()];
    let files = vec![(config.clone(), "/etc/kiln/kiln.toml".to_string())];

    // Boot 1: scripts/testhost starts swtpm (--tpm), measured boot (--ima).
    let args: Vec<String> = vec!["--tpm".into(), state.display().to_string(), "--ima".into()];
    let run1 = TestHost::run_with_args(
        &boot1_script(),
        &bins,
        &files,
        &args,
        Duration::from_secs(600),
    )
    .expect("test host");
    eprintln!("boot 1: {:.1} s", run1.elapsed.as_secs_f64());
    let b1 = check_boot(&run1, "boot 1");
    assert!(run1.line_with(&format!("MB-PROBE-RAN {nonce}")).is_some());
    assert!(run1.line_with("MB-KEY-MADE").is_some(), "{}", run1.output);
    assert!(run1.line_with("MB-CONFIG-GROUP-WRONG").is_none());

    // What ran and what was read is in the log with the files' digests.
    for (path, local) in [
        ("/kiln/bin/kiln-mb-probe", probe.as_path()),
        ("/kiln/bin/tpm2", tpm2),
        ("/etc/kiln/kiln.toml", config.as_path()),
    ] {
        let want = sha256(&std::fs::read(local).unwrap());
        let e = entry(&b1, path).unwrap_or_else(|| panic!("boot 1: {path} not in the IMA log"));
        assert_eq!(hex(&e.file_digest), hex(&want), "boot 1: digest of {path}");
    }
    // Executables mapped by the dynamic loader (MMAP_CHECK), modules
    // (MODULE_CHECK), and the test host's /init.
    for path in ["/usr/lib/x86_64-linux-gnu/libtss2-esys.so.0", "/init"] {
        assert!(
            entry(&b1, path).is_some(),
            "boot 1: {path} not in the IMA log"
        );
    }
    assert!(
        b1.ima.iter().any(|e| e.name.ends_with("/kvm.ko")),
        "boot 1: kvm.ko not in the IMA log"
    );

    // Boot 2: the same TPM state, swtpm started by the Rust harness.
    let tpm = Swtpm::for_testhost(&state).expect("swtpm");
    let mut args: Vec<String> = vec!["--ima".into()];
    for a in tpm.qemu_args() {
        args.push("--qemu-arg".into());
        args.push(a);
    }
    let run2 = TestHost::run_with_args(
        &boot2_script(),
        &[tpm2.to_path_buf()],
        &[],
        &args,
        Duration::from_secs(600),
    )
    .expect("test host");
    drop(tpm);
    eprintln!("boot 2: {:.1} s", run2.elapsed.as_secs_f64());
    let b2 = check_boot(&run2, "boot 2");
    // PCR 10 started over: boot 2's log alone replays to it, and it holds
    // nothing of boot 1's run.
    assert_eq!(
        b2.ima.iter().filter(|e| e.name == "boot_aggregate").count(),
        1
    );
    assert!(entry(&b2, "/kiln/bin/kiln-mb-probe").is_none());
    assert!(entry(&b2, "/etc/kiln/kiln.toml").is_none());
    assert_ne!(b1.pcrs[&10], b2.pcrs[&10]);
    // Same firmware, same boot: the same PCRs 0-7.
    assert_eq!(b1.bios_events.len(), b2.bios_events.len());
    for i in 0..8 {
        assert_eq!(
            hex(&b1.pcrs[&i]),
            hex(&b2.pcrs[&i]),
            "PCR {i} differs between the boots"
        );
        assert_eq!(b1.bios.get(&i), b2.bios.get(&i));
    }
    // The key made in boot 1 survived the reboot.
    assert!(
        b1.key_name.is_some(),
        "boot 1: no persistent key\n{}",
        run1.output
    );
    assert_eq!(b1.key_name, b2.key_name, "the persistent key changed");
    // Kept when the test fails, to look at (swtpm.log is in the TPM state).
    let _ = std::fs::remove_dir_all(&dir);
}

/// tpm2-tools against a TCP swtpm; returns stdout.
fn tpm2_tool(tcti: &str, args: &[&str]) -> String {
    let out = Command::new("tpm2")
        .args(args)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .expect("tpm2");
    assert!(
        out.status.success(),
        "tpm2 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn swtpm_over_tcp_resets_pcrs_on_reboot_and_keeps_keys() {
    if !Swtpm::available() {
        return;
    }
    if !Path::new("/usr/bin/tpm2").is_file() {
        skip("tpm2-tools not installed (apt-get install tpm2-tools)");
        return;
    }
    let dir = target_dir().join(format!("kiln-tests/swtpm-tcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut tpm = Swtpm::tcp(&dir).expect("swtpm");
    let tcti = tpm.tcti();
    assert!(tcti.starts_with("swtpm:host=127.0.0.1,port="), "{tcti}");

    let read16 =
        |tcti: &str| parse_pcrread(tpm2_tool(tcti, &["pcrread", "sha256:16"]).lines())[&16];
    assert_eq!(read16(&tcti), [0; 32]);
    let d = sha256(b"kiln");
    tpm2_tool(&tcti, &["pcrextend", &format!("16:sha256={}", hex(&d))]);
    let mut want = [0u8; 32];
    extend(&mut want, &d);
    assert_eq!(read16(&tcti), want);
    // The EK that swtpm_setup made is persistent.
    let handles = tpm2_tool(&tcti, &["getcap", "handles-persistent"]);
    assert!(handles.contains("0x81010001"), "{handles}");

    tpm.reboot().expect("reboot");
    assert_eq!(tpm.tcti(), tcti, "same ports after reboot");
    assert_eq!(read16(&tcti), [0; 32], "PCR 16 not reset by the reboot");
    let after = tpm2_tool(&tcti, &["getcap", "handles-persistent"]);
    assert_eq!(handles, after, "persistent handles changed");
    drop(tpm);
    let _ = std::fs::remove_dir_all(&dir);

    // A bare TPM (swtpm's own manufacture): no persistent keys, all banks.
    let mut tpm = Swtpm::tcp_with(&dir, Manufacture::Bare).expect("swtpm");
    let tcti = tpm.tcti();
    let banks = tpm2_tool(&tcti, &["getcap", "pcrs"]);
    assert!(
        banks.contains("sha1") && banks.contains("sha256"),
        "{banks}"
    );
    let handles = tpm2_tool(&tcti, &["getcap", "handles-persistent"]);
    assert!(!handles.contains("0x81"), "{handles}");
    tpm.reboot().expect("reboot");
    drop(tpm);
    let _ = std::fs::remove_dir_all(&dir);
}

const EV_EVENT_TAG: u32 = 0x6;
const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;

/// UEFI firmware (OVMF): the firmware measures the kernel it starts (PCR 4)
/// and Linux's EFI stub measures its command line and the initramfs
/// (PCR 9), so the whole test host, Kiln's binaries in the initramfs
/// included, is covered by PCRs that IMA's boot_aggregate also covers.
#[test]
fn measured_boot_with_uefi_firmware() {
    if !require_testhost() || !Swtpm::available() {
        return;
    }
    let ovmf = Path::new("/usr/share/ovmf/OVMF.fd");
    if !ovmf.is_file() || !Path::new("/usr/bin/tpm2").is_file() {
        skip("UEFI measured boot needs ovmf and tpm2-tools (apt-get install ovmf tpm2-tools)");
        return;
    }
    let dir = target_dir().join(format!(
        "kiln-tests/measured-boot-uefi-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let args: Vec<String> = vec![
        "--tpm".into(),
        dir.join("tpm").display().to_string(),
        "--ima".into(),
        "--uefi".into(),
    ];
    let run = TestHost::run_with_args(
        &format!("{SCRIPT_LIB}pcrs\nlogs\n"),
        &[PathBuf::from("/usr/bin/tpm2")],
        &[],
        &args,
        Duration::from_secs(600),
    )
    .expect("test host");
    eprintln!("UEFI boot: {:.1} s", run.elapsed.as_secs_f64());
    let b = check_boot(&run, "UEFI boot");

    let kernel = b
        .bios_events
        .iter()
        .find(|e| e.pcr == 4 && e.typ == EV_EFI_BOOT_SERVICES_APPLICATION);
    assert!(
        kernel.is_some(),
        "UEFI boot: no kernel (EFI application) in PCR 4"
    );
    let tagged = |what: &[u8]| {
        b.bios_events.iter().find(|e| {
            e.pcr == 9 && e.typ == EV_EVENT_TAG && e.data.windows(what.len()).any(|w| w == what)
        })
    };
    assert!(
        tagged(b"LOADED_IMAGE::LoadOptions").is_some(),
        "UEFI boot: kernel command line not measured into PCR 9"
    );
    let initrd = tagged(b"Linux initrd").expect("UEFI boot: initramfs not measured into PCR 9");
    // scripts/testhost says which initramfs it booted.
    let want = run
        .stderr
        .lines()
        .find_map(|l| l.split("initrd sha256 ").nth(1))
        .expect("scripts/testhost prints the initrd's sha256")
        .trim();
    assert_eq!(
        hex(&initrd.sha256.unwrap()),
        want,
        "UEFI boot: PCR 9 initrd digest"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
