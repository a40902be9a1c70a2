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
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
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
