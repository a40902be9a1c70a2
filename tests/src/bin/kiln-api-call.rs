//! kiln-api-call: one request to kiln-vmm's control API, for test-host
//! scripts (whose busybox has no HTTP client for Unix sockets).
//!
//! ```text
//! kiln-api-call SOCKET METHOD PATH [BODY]
//! ```
//!
//! Prints `API-STATUS <code>` and then the response body on one line; exits
//! 0 for a 2xx status, 1 for any other, 2 when no response came.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, method, path) = match &args[..] {
        [s, m, p] | [s, m, p, _] => (s, m, p),
        _ => {
            eprintln!("usage: kiln-api-call SOCKET METHOD PATH [BODY]");
            return ExitCode::from(2);
        }
    };
    let body = args.get(3).map(String::as_str).unwrap_or("");
    let response = (|| -> std::io::Result<String> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        read_response(&mut s)
    })();
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln-api-call: {socket}: {e}");
            return ExitCode::from(2);
        }
    };
    let status: u16 = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    println!("API-STATUS {status}");
    if !body.is_empty() {
        println!("{body}");
    }
    if (200..300).contains(&status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The response: read to its end as its Content-Length says (or to the
/// end of the stream without one), since a server may keep the connection
/// open despite `Connection: close` (Firecracker's does).
fn read_response(s: &mut UnixStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let no_body = head
                .split(' ')
                .nth(1)
                .is_some_and(|c| c == "204" || c == "304");
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .or(no_body.then_some(0));
            if length.is_some_and(|n| out.len() >= end + 4 + n) {
                break;
            }
        }
        match s.read(&mut buf)? {
            0 => break,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
