//! The control API's server: HTTP/1.1 on a Unix socket, one synchronous
//! thread, one connection at a time (keep-alive honoured). httparse reads
//! the request head; the head is capped at [`MAX_HEAD_BYTES`] and the body
//! at [`MAX_BODY_BYTES`]; a client that goes quiet for [`IDLE_TIMEOUT_MS`]
//! is dropped, so it cannot hold the API.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_devices::{ExitSignal, VmExit};

use super::parse;
use super::{ApiError, ApiReply, ApiSender};
use crate::runtime::ThreadHook;

/// Request line and headers, at most.
pub const MAX_HEAD_BYTES: usize = 8 << 10;
/// Request body, at most.
pub const MAX_BODY_BYTES: usize = 64 << 10;
const MAX_HEADERS: usize = 32;
/// How long a connection may stay silent in the middle of (or before) a
/// request.
pub const IDLE_TIMEOUT_MS: i32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the API thread: {0}")]
    Spawn(io::Error),
}

/// Binds the API socket (see [`crate::socket::bind`]).
pub fn bind(path: &Path) -> Result<UnixListener, crate::socket::Error> {
    crate::socket::bind("--api-socket", path)
}

/// Starts the API thread. It runs `confine` first; if that fails the VM
/// ends with an error rather than serve unconfined.
pub fn spawn(
    listener: UnixListener,
    api: ApiSender,
    confine: ThreadHook,
    exit: Arc<ExitSignal>,
) -> Result<JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name("kiln-api".into())
        .stack_size(kiln_devices::THREAD_STACK_SIZE)
        .spawn(move || {
            if let Err(e) = confine() {
                exit.signal(VmExit::Error(format!("API thread: {e}")));
                return;
            }
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => Connection::new(stream).serve(&api),
                    Err(e) => tracing::warn!("API: accept failed: {e}"),
                }
            }
        })
        .map_err(Error::Spawn)
}

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    /// The client wants the connection closed after the response.
    close: bool,
}

/// Why no request could be read: answer with this error and close, or
/// just close (`None`: the client left or went quiet).
type ReadError = Option<ApiError>;

struct Connection<S> {
    stream: S,
    buf: Vec<u8>,
}

/// After refusing a request, how much of the rest of it is read and
/// dropped before closing, and how long that may take: closing a Unix
/// socket with unread input makes the client's read fail (ECONNRESET)
/// before it sees the response.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIMEOUT_MS: i32 = 200;

/// What a connection reads from: a socket that can wait for input.
trait Input: Read + Write {
    /// Waits up to `timeout_ms` for input; false on timeout.
    fn wait_readable(&self, timeout_ms: i32) -> bool;
}

impl Input for UnixStream {
    fn wait_readable(&self, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, for a descriptor this stream owns.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return n > 0;
            }
        }
    }
}

impl<S: Input> Connection<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Serves requests until the client closes or asks to, or errs.
    fn serve(mut self, api: &ApiSender) {
        loop {
            let req = match self.read_request() {
                Ok(Some(req)) => req,
                Ok(None) | Err(None) => return,
                Err(Some(e)) => {
                    let _ = self.stream.write_all(&error_response(&e, None, true));
                    self.drain();
                    return;
                }
            };
            let allow = parse::allowed_method(&req.path);
            let (bytes, written) = match parse::parse(&req.method, &req.path, &req.body) {
                Err(e) => (error_response(&e, allow, req.close), None),
                Ok(action) => {
                    let r = api.call(action);
                    let bytes = match r.result {
                        Ok(ApiReply::Done) => response(204, None, req.close),
                        Ok(ApiReply::Info(v)) => response(
                            200,
                            Some(("application/json", v.to_string().as_bytes())),
                            req.close,
                        ),
                        Ok(ApiReply::Accepted(v)) => response(
                            202,
                            Some(("application/json", v.to_string().as_bytes())),
                            req.close,
                        ),
                        Err(e) => error_response(&e, None, req.close),
                    };
                    (bytes, r.written)
                }
            };
            let ok = self
                .stream
                .write_all(&bytes)
                .and_then(|()| self.stream.flush())
                .is_ok();
            if let Some(w) = written {
                let _ = w.send(());
            }
            if !ok || req.close {
                return;
            }
        }
    }

    /// Reads and drops what the client still sends, within limits.
    fn drain(&mut self) {
        let mut dropped = 0;
        let mut chunk = [0u8; 4096];
        while dropped < DRAIN_BYTES && self.stream.wait_readable(DRAIN_TIMEOUT_MS) {
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
        }
    }

    /// Reads more bytes into `buf`; false at end of input, on a timeout or
    /// an error.
    fn fill(&mut self) -> bool {
        if !self.stream.wait_readable(IDLE_TIMEOUT_MS) {
            return false;
        }
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// The next request; Ok(None) when the client closed between requests.
    fn read_request(&mut self) -> Result<Option<Request>, ReadError> {
        loop {
            if !self.buf.is_empty() {
                if let Some((head_len, mut req, body_len)) = parse_head(&self.buf)? {
                    while self.buf.len() - head_len < body_len {
                        if !self.fill() {
                            return Err(None);
                        }
                    }
                    req.body = self.buf[head_len..head_len + body_len].to_vec();
                    self.buf.drain(..head_len + body_len);
                    return Ok(Some(req));
                }
            }
            if !self.fill() {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(None)
                };
            }
        }
    }
}

/// Parses a request head out of `buf`: its length, the request (without
/// its body) and the body's length; None while the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Request, usize)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Some(ApiError::too_large(format!(
                "the request head is larger than {MAX_HEAD_BYTES} bytes"
            ))))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Some(ApiError::too_large(format!(
                "more than {MAX_HEADERS} headers"
            ))))
        }
        Err(e) => {
            return Err(Some(ApiError::bad_request(format!(
                "malformed HTTP request: {e}"
            ))))
        }
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(Some(ApiError::too_large(format!(
            "the request head is larger than {MAX_HEAD_BYTES} bytes"
        ))));
    }
    let version = req.version.unwrap_or(1);
    let mut body_len: Option<usize> = None;
    let mut close = version == 0;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| Some(ApiError::bad_request("Content-Length is not a number")))?;
            if body_len.is_some_and(|b| b != n) {
                return Err(Some(ApiError::bad_request(
                    "conflicting Content-Length headers",
                )));
            }
            body_len = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Some(ApiError::bad_request(
                "Transfer-Encoding is not supported: send Content-Length",
            )));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Err(Some(ApiError::too_large(format!(
            "the body is larger than {MAX_BODY_BYTES} bytes"
        ))));
    }
    let request = Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        body: Vec::new(),
        close,
    };
    Ok(Some((head_len, request, body_len)))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    }
}

fn response(status: u16, body: Option<(&str, &[u8])>, close: bool) -> Vec<u8> {
    response_with(status, body, close, None)
}

fn response_with(
    status: u16,
    body: Option<(&str, &[u8])>,
    close: bool,
    allow: Option<&str>,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some((ctype, bytes)) = body {
        out.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    if let Some(a) = allow {
        out.push_str(&format!("Allow: {a}\r\n"));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if let Some((_, bytes)) = body {
        out.extend_from_slice(bytes);
    }
    out
}

/// `{"error": "..."}` with the error's status.
fn error_response(e: &ApiError, allow: Option<&str>, close: bool) -> Vec<u8> {
    let status = match e.status {
        400 | 404 | 405 | 409 | 413 | 500 | 502 | 504 => e.status,
        _ => 500,
    };
    let body = serde_json::json!({ "error": e.message }).to_string();
    let allow = if status == 405 { allow } else { None };
    response_with(
        status,
        Some(("application/json", body.as_bytes())),
        close,
        allow,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted client: what it sends, arriving in the given pieces, and
    /// what the server wrote back.
    struct Script {
        pieces: std::collections::VecDeque<Vec<u8>>,
        out: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut p) = self.pieces.pop_front() else {
                return Ok(0);
            };
            let n = p.len().min(buf.len());
            buf[..n].copy_from_slice(&p[..n]);
            if n < p.len() {
                self.pieces.push_front(p.split_off(n));
            }
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Input for Script {
        fn wait_readable(&self, _timeout_ms: i32) -> bool {
            true
        }
    }

    fn conn(pieces: &[&[u8]]) -> Connection<Script> {
        Connection::new(Script {
            pieces: pieces.iter().map(|p| p.to_vec()).collect(),
            out: Vec::new(),
        })
    }

    #[test]
    fn reads_requests_split_anywhere_and_back_to_back() {
        let mut c = conn(&[
            b"PUT /vm/pa",
            b"use HTTP/1.1\r\nContent-Length: 2\r\n\r\n{",
            b"}GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n",
        ]);
        let r = c.read_request().unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/vm/pause"));
        assert_eq!((r.body.as_slice(), r.close), (&b"{}"[..], false));
        let r = c.read_request().unwrap().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.close),
            ("GET", "/vm", true)
        );
        assert!(r.body.is_empty());
        assert_eq!(c.read_request(), Ok(None));
    }

    #[test]
    fn http_1_0_closes_unless_kept_alive() {
        let r = conn(&[b"GET /vm HTTP/1.0\r\n\r\n"]).read_request();
        assert!(r.unwrap().unwrap().close);
        let r = conn(&[b"GET /vm HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"]).read_request();
        assert!(!r.unwrap().unwrap().close);
    }

    fn status_of(input: &[u8]) -> Option<u16> {
        match conn(&[input]).read_request() {
            Err(Some(e)) => Some(e.status),
            _ => None,
        }
    }

    #[test]
    fn bad_or_oversized_requests_get_their_status() {
        assert_eq!(status_of(b"GARBAGE\r\n\r\n"), Some(400));
        assert_eq!(
            status_of(b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status_of(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status_of(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status_of(b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(400)
        );
        let big = format!(
            "PUT /vm/pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            64 * 1024 + 1
        );
        assert_eq!(status_of(big.as_bytes()), Some(413));
        let long_head = format!("GET /vm HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(status_of(long_head.as_bytes()), Some(413));
        let many = format!(
            "GET /vm HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(status_of(many.as_bytes()), Some(413));
    }

    #[test]
    fn a_client_leaving_mid_request_is_just_dropped() {
        assert_eq!(conn(&[b"GET /vm HT"]).read_request(), Err(None));
        assert_eq!(
            conn(&[b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{"]).read_request(),
            Err(None)
        );
        assert_eq!(conn(&[]).read_request(), Ok(None));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: xorshift bytes around HTTP-ish seeds.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let seeds: [&[u8]; 3] = [
            b"GET /vm HTTP/1.1\r\n\r\n",
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"\r\n\r\n",
        ];
        for i in 0..3000 {
            let mut input = seeds[i % 3].to_vec();
            for _ in 0..(i % 7) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % input.len();
                input[at] = (x >> 32) as u8;
            }
            let mut c = conn(&[&input]);
            let _ = c.read_request();
            let _ = parse_head(&input);
        }
    }

    #[test]
    fn responses_are_well_formed() {
        let r = String::from_utf8(response(204, None, false)).unwrap();
        assert_eq!(r, "HTTP/1.1 204 No Content\r\n\r\n");
        let e = ApiError::method_not_allowed("no");
        let r = String::from_utf8(error_response(&e, Some("PUT"), true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("\r\nAllow: PUT\r\n"), "{r}");
        assert!(r.contains("\r\nConnection: close\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n{\"error\":\"no\"}"), "{r}");
        assert!(r.contains("Content-Length: 14\r\n"), "{r}");
    }
}
