//! From an HTTP request's method, path and body to a [`VmAction`]: pure
//! code, no I/O, every input answered with an action or an [`ApiError`].

use super::{ApiError, MigrateParams, SnapshotParams, VmAction};

/// What a route does with its body.
#[derive(Clone, Copy)]
enum Route {
    /// No arguments: the body is empty or `{}`.
    Fixed(fn() -> VmAction),
    Snapshot,
    Migrate,
}

/// The routes: path, the one method it takes, what it does.
const ROUTES: &[(&str, &str, Route)] = &[
    ("/vm", "GET", Route::Fixed(|| VmAction::Info)),
    ("/vm/shutdown", "PUT", Route::Fixed(|| VmAction::Shutdown)),
    ("/vm/power-off", "PUT", Route::Fixed(|| VmAction::PowerOff)),
    ("/vm/pause", "PUT", Route::Fixed(|| VmAction::Pause)),
    ("/vm/resume", "PUT", Route::Fixed(|| VmAction::Resume)),
    ("/vm/reboot", "PUT", Route::Fixed(|| VmAction::Reboot)),
    ("/vm/snapshot", "PUT", Route::Snapshot),
    ("/vm/migrate", "PUT", Route::Migrate),
];

/// The method `path` takes, if it is a route (for 405's `Allow`).
pub fn allowed_method(path: &str) -> Option<&'static str> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    ROUTES.iter().find(|r| r.0 == path).map(|r| r.1)
}

/// Parses one request. Routes without arguments take an empty body or an
/// empty JSON object (`{}`); the others a JSON object of their arguments.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<VmAction, ApiError> {
    // A query string changes nothing.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let Some(&(_, want, route)) = ROUTES.iter().find(|r| r.0 == path) else {
        return Err(ApiError::not_found(format!(
            "no such resource: {}",
            printable(path)
        )));
    };
    if method != want {
        return Err(ApiError::method_not_allowed(format!(
            "{path} takes {want}, not {}",
            printable(method)
        )));
    }
    match route {
        Route::Fixed(action) => {
            check_empty_body(body)?;
            Ok(action())
        }
        Route::Snapshot => {
            let p: SnapshotParams = arguments(path, body)?;
            if p.destination_dir.as_os_str().is_empty() {
                return Err(ApiError::bad_request("destination_dir is empty"));
            }
            Ok(VmAction::Snapshot(p))
        }
        Route::Migrate => {
            let p: MigrateParams = arguments(path, body)?;
            if p.downtime_ms == 0 || p.downtime_ms > 60_000 {
                return Err(ApiError::bad_request("downtime_ms must be from 1 to 60000"));
            }
            if p.timeout_s == 0 || p.timeout_s > 86_400 {
                return Err(ApiError::bad_request("timeout_s must be from 1 to 86400"));
            }
            Ok(VmAction::Migrate(p))
        }
    }
}

/// A route's JSON arguments.
fn arguments<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "{path} needs a JSON body with its arguments"
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "{path}: bad arguments: {}",
            printable_long(&e.to_string())
        ))
    })
}

fn check_empty_body(body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) if m.is_empty() => Ok(()),
        Ok(_) => Err(ApiError::bad_request(
            "this endpoint takes no arguments: send no body or {}",
        )),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}

/// serde's message (which may quote client text), on one line, at most 160
/// characters.
fn printable_long(s: &str) -> String {
    let mut out: String = s.chars().take(160).flat_map(char::escape_default).collect();
    if s.chars().count() > 160 {
        out.push_str("...");
    }
    out
}

/// At most 64 characters of client text, control characters escaped, for
/// an error message that stays on one line.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_parses() {
        for (path, method, route) in ROUTES {
            if let Route::Fixed(action) = route {
                assert_eq!(parse(method, path, b""), Ok(action()), "{method} {path}");
            }
        }
        assert_eq!(parse("GET", "/vm?x=1", b""), Ok(VmAction::Info));
    }

    #[test]
    fn bodies_may_be_empty_or_an_empty_object() {
        for body in [&b""[..], b"{}", b" { }\r\n", b"\n"] {
            assert_eq!(parse("PUT", "/vm/pause", body), Ok(VmAction::Pause));
        }
        for body in [&b"{\"force\":true}"[..], b"[]", b"null", b"{", b"\xff\xfe"] {
            let e = parse("PUT", "/vm/pause", body).unwrap_err();
            assert_eq!(e.status, 400, "{body:?}: {e}");
        }
    }

    #[test]
    fn snapshot_and_migrate_take_their_arguments() {
        assert_eq!(
            parse("PUT", "/vm/snapshot", br#"{"destination_dir":"/tmp/s"}"#),
            Ok(VmAction::Snapshot(SnapshotParams {
                destination_dir: "/tmp/s".into()
            }))
        );
        let m = parse(
            "PUT",
            "/vm/migrate",
            br#"{"destination":"unix:/run/m.sock"}"#,
        );
        assert_eq!(
            m,
            Ok(VmAction::Migrate(MigrateParams {
                destination: "unix:/run/m.sock".into(),
                downtime_ms: 300,
                timeout_s: 600,
                secret_file: None,
            }))
        );
        for (path, body) in [
            ("/vm/snapshot", &b""[..]),
            ("/vm/snapshot", b"{}"),
            ("/vm/snapshot", br#"{"destination_dir":""}"#),
            ("/vm/snapshot", br#"{"destination_dir":"/x","extra":1}"#),
            ("/vm/snapshot", br#"{"destination_dir":7}"#),
            (
                "/vm/migrate",
                br#"{"destination":"unix:/x","downtime_ms":0}"#,
            ),
            ("/vm/migrate", br#"{"destination":"unix:/x","timeout_s":0}"#),
            ("/vm/migrate", br#"{"downtime_ms":10}"#),
        ] {
            let e = parse("PUT", path, body).unwrap_err();
            assert_eq!(e.status, 400, "{path} {body:?}: {e}");
            assert!(!e.message.contains('\n'), "{e}");
        }
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        for path in ["/", "/vm/", "/vms", "/vm/pause/now", "", "vm", "/VM"] {
            assert_eq!(parse("GET", path, b"").unwrap_err().status, 404, "{path:?}");
        }
        assert_eq!(parse("PUT", "/vm", b"").unwrap_err().status, 405);
        assert_eq!(parse("GET", "/vm/pause", b"").unwrap_err().status, 405);
        assert_eq!(parse("POST", "/vm/reboot", b"").unwrap_err().status, 405);
        assert_eq!(parse("put", "/vm/reboot", b"").unwrap_err().status, 405);
        assert_eq!(allowed_method("/vm/reboot"), Some("PUT"));
        assert_eq!(allowed_method("/nope"), None);
    }

    #[test]
    fn error_messages_stay_short_and_on_one_line() {
        let path = format!("/{}\n\u{1b}", "x".repeat(500));
        let e = parse("GET", &path, b"").unwrap_err();
        assert!(!e.message.contains('\n'), "{e}");
        assert!(e.message.len() < 120, "{e}");
        let e = parse("DELETE\r\n", "/vm", b"").unwrap_err();
        assert!(!e.message.contains('\n'), "{e}");
    }
}
