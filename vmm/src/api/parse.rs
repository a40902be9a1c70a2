//! From an HTTP request's method, path and body to a [`VmAction`]: pure
//! code, no I/O, every input answered with an action or an [`ApiError`].

use super::{ApiError, VmAction};

/// The routes: path, the one method it takes, the action.
const ROUTES: &[(&str, &str, VmAction)] = &[
    ("/vm", "GET", VmAction::Info),
    ("/vm/shutdown", "PUT", VmAction::Shutdown),
    ("/vm/power-off", "PUT", VmAction::PowerOff),
    ("/vm/pause", "PUT", VmAction::Pause),
    ("/vm/resume", "PUT", VmAction::Resume),
    ("/vm/reboot", "PUT", VmAction::Reboot),
];

/// The method `path` takes, if it is a route (for 405's `Allow`).
pub fn allowed_method(path: &str) -> Option<&'static str> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    ROUTES.iter().find(|r| r.0 == path).map(|r| r.1)
}

/// Parses one request. None of the routes takes arguments: a body must be
/// empty or an empty JSON object (`{}`).
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<VmAction, ApiError> {
    // A query string changes nothing.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let Some(&(_, want, action)) = ROUTES.iter().find(|r| r.0 == path) else {
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
    check_empty_body(body)?;
    Ok(action)
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
        for (path, method, action) in ROUTES {
            assert_eq!(parse(method, path, b""), Ok(*action), "{method} {path}");
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
