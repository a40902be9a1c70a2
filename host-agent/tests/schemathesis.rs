//! schemathesis (from PyPI, installed by `scripts/install-deps` into
//! `target/py`) against the live agent's OpenAPI document: generated and
//! mutated requests for every operation, a bounded number of examples; no
//! 5xx, no response that breaks the documented schema, status or content
//! type.

use std::path::Path;
use std::process::Command;

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let root = kiln_tests::repo_root();
    let st = root.join("target/py/bin/schemathesis");
    if !st.is_file() {
        let msg = format!("{} is missing: run scripts/install-deps", st.display());
        kiln_tests::skip(msg);
        return;
    }
    let work = std::env::temp_dir().join(format!("kiln-schemathesis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("unshare")
        .args(["--net", "bash"])
        .arg(manifest.join("tests/schemathesis.sh"))
        .arg(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg(&st)
        .arg(manifest.join("openapi.json"))
        .arg(&work)
        .arg("25")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(work.join("agent.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}\nagent log:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really tested every operation but the event stream.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest.join("openapi.json")).unwrap())
            .unwrap();
    let ops: usize = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(p, _)| !p.contains("stream"))
        .map(|(_, item)| item.as_object().unwrap().len())
        .sum();
    assert!(
        stdout.contains(&format!("Tested: {ops}")),
        "expected {ops} operations tested:\n{stdout}"
    );
    println!(
        "{}",
        stdout
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
