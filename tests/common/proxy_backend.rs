//! A backend that receives the PROXY protocol: it reads the header HAProxy sends before a
//! connection's bytes (v1 or v2, parsed with `ppp`) or notes there was none, records it, answers
//! one line naming what it saw (`A proxy=v2 src=127.0.0.3:54321`), then echoes every byte back
//! until the peer closes. So a client can check that its own address and port went through, and
//! an idle connection can be kept open and probed.
//!
//! HAProxy's health checks are connections too: on the traffic port with `send-proxy` they carry
//! a v1 line for the check's own connection (`PROXY TCP4 <LB> <node> ...`: HAProxy 2.6 and 3.2
//! build it from the connection, not `PROXY UNKNOWN`) or a v2 LOCAL command, and close at once;
//! plain TCP checks send nothing. Each is read
//! and recorded like any other connection, and a write to a peer gone is ignored.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ppp::PartialResult;

/// What came before a connection's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// No PROXY header: the first bytes were the client's own (or the peer closed first).
    None,
    /// `PROXY TCP4|TCP6 ...`: the client's address and port.
    V1(SocketAddr),
    /// A v2 PROXY command for an IPv4 or IPv6 TCP client.
    V2(SocketAddr),
    /// `PROXY UNKNOWN` (HAProxy's v1 checks send a TCP4/TCP6 line instead; kept for completeness).
    V1Unknown,
    /// A v2 LOCAL command (or no address): what HAProxy's v2 health checks send.
    V2Local,
    /// Bytes that began like a header but did not parse: ppp's words.
    Invalid(String),
}

impl Header {
    /// The words of the reply line after the backend's name: `proxy=v1 src=1.2.3.4:5`,
    /// `proxy=none`, `proxy=v2-local`...
    pub fn describe(&self) -> String {
        match self {
            Header::None => "proxy=none".into(),
            Header::V1(src) => format!("proxy=v1 src={src}"),
            Header::V2(src) => format!("proxy=v2 src={src}"),
            Header::V1Unknown => "proxy=v1-unknown".into(),
            Header::V2Local => "proxy=v2-local".into(),
            Header::Invalid(why) => format!("proxy=invalid {why}"),
        }
    }
}

/// One connection as the backend saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Who connected (HAProxy, for traffic through it).
    pub peer: SocketAddr,
    pub header: Header,
}

/// The v2 signature; v1 headers start with `PROXY `.
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// How long a connection may stay silent before the backend gives up on it: above any idle
/// time a test measures, so only a peer that vanished is cut.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// Whether `buf` so far could still be the start of `signature`.
fn could_be(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

/// The header at the start of `buf` and how many bytes it took, or `None` while more bytes
/// could complete it (and `closed` is false: at the end of the stream, what is there is final).
fn classify(buf: &[u8], closed: bool) -> Option<(Header, usize)> {
    if buf.is_empty() {
        return closed.then_some((Header::None, 0));
    }
    if could_be(buf, V2_SIGNATURE) {
        let parsed = ppp::v2::Header::try_from(buf);
        if parsed.is_incomplete() && !closed {
            return None;
        }
        return Some(match parsed {
            Ok(h) => {
                let header = match (h.command, h.addresses) {
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                        Header::V2(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                        Header::V2(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (ppp::v2::Command::Local, _) | (_, ppp::v2::Addresses::Unspecified) => {
                        Header::V2Local
                    }
                    (_, other) => Header::Invalid(format!("v2 addresses {other:?}")),
                };
                (header, h.len())
            }
            Err(e) => (Header::Invalid(format!("v2: {e}")), buf.len()),
        });
    }
    if could_be(buf, V1_SIGNATURE) {
        let parsed = ppp::v1::Header::try_from(buf);
        if parsed.is_incomplete() && !closed {
            return None;
        }
        return Some(match parsed {
            Ok(h) => {
                let header = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Header::V1(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Header::V1(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => Header::V1Unknown,
                };
                (header, h.header.len())
            }
            Err(e) => (Header::Invalid(format!("v1: {e}")), buf.len()),
        });
    }
    Some((Header::None, 0))
}

/// A PROXY-protocol-reading echo backend on a loopback address.
pub struct ProxyBackend {
    pub addr: SocketAddr,
    /// The first word of every reply line, to tell backends apart behind one frontend.
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProxyBackend {
    /// Listens on `ip` (a loopback address such as 127.0.0.2) on a port the kernel picks.
    pub fn start(ip: &str, name: &str) -> ProxyBackend {
        let listener =
            TcpListener::bind(format!("{ip}:0")).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop, name) = (seen.clone(), stop.clone(), name.to_string());
            std::thread::spawn(move || {
                loop {
                    let conn = listener.accept();
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // The peer as accept() saw it: a check that reset at once has no peer
                    // address by the time the socket is asked.
                    let Ok((c, peer)) = conn else { continue };
                    let (seen, name) = (seen.clone(), name.clone());
                    // Detached: each ends when its peer closes or after IDLE_LIMIT of silence.
                    std::thread::spawn(move || serve(c, peer, &name, &seen));
                }
            })
        };
        ProxyBackend {
            addr,
            name: name.to_string(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn ip(&self) -> String {
        self.addr.ip().to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every connection so far, in the order their headers were read.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The reply line this backend sends for `header`.
    pub fn reply_for(&self, header: &Header) -> String {
        format!("{} {}", self.name, header.describe())
    }
}

fn serve(mut c: TcpStream, peer: SocketAddr, name: &str, seen: &Mutex<Vec<Seen>>) {
    let _ = c.set_read_timeout(Some(IDLE_LIMIT));
    let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // A header is at most 107 bytes (v1) or 16 + 65535 (v2): bounded by what it announces.
    let (header, used) = loop {
        let n = c.read(&mut chunk).unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(found) = classify(&buf, n == 0) {
            break found;
        }
    };
    seen.lock().unwrap().push(Seen {
        peer,
        header: header.clone(),
    });
    if c.write_all(format!("{name} {}\n", header.describe()).as_bytes())
        .is_err()
    {
        return;
    }
    if c.write_all(&buf[used..]).is_err() {
        return;
    }
    loop {
        match c.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c.shutdown(Shutdown::Both);
}

impl Drop for ProxyBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client connection to a [`ProxyBackend`] (directly or through HAProxy) that has said hello
/// and read what the backend saw.
pub struct ProxyClient {
    pub stream: TcpStream,
    /// The client's own address and port: what a PROXY header should carry.
    pub local: SocketAddr,
    /// The backend's reply line, without the newline.
    pub reply: String,
}

/// The first bytes a client sends: not a PROXY signature, so a backend reached without a
/// header sees them as the client's own.
const HELLO: &[u8] = b"hello\n";

impl ProxyClient {
    /// Connects to `to` (from the loopback address `from` when given, an IPv4 one), sends a
    /// hello and reads the backend's reply line and the hello's echo, within 5 s.
    pub fn connect(from: Option<IpAddr>, to: SocketAddr) -> Result<ProxyClient, String> {
        ProxyClient::connect_with(from, to, b"")
    }

    /// [`Self::connect`], sending `preamble` before the hello: a header the test makes up, to
    /// check the backend itself.
    pub fn connect_with(
        from: Option<IpAddr>,
        to: SocketAddr,
        preamble: &[u8],
    ) -> Result<ProxyClient, String> {
        let stream = match from {
            Some(ip) => super::agent::connect_from(ip, to),
            None => TcpStream::connect_timeout(&to, Duration::from_secs(2)),
        }
        .map_err(|e| format!("connect to {to}: {e}"))?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        let mut c = ProxyClient {
            stream,
            local,
            reply: String::new(),
        };
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        c.stream
            .write_all(&[preamble, HELLO].concat())
            .map_err(|e| format!("write: {e}"))?;
        c.reply = c.read_line()?;
        let echo = c.read_line()?;
        if echo.as_bytes() != &HELLO[..HELLO.len() - 1] {
            return Err(format!("reply {:?}, then {echo:?}, not the hello", c.reply));
        }
        Ok(c)
    }

    /// Reads up to and without the next newline, byte by byte so nothing after it is taken.
    pub fn read_line(&mut self) -> Result<String, String> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
                Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
                Ok(_) if line.len() < 4096 => line.push(b[0]),
                Ok(_) => return Err("a line over 4 KiB".into()),
                Err(e) => return Err(format!("read after {line:?}: {e}")),
            }
        }
    }

    /// Sends `line` and reads its echo.
    pub fn echo(&mut self, line: &str) -> Result<String, String> {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        self.read_line()
    }
}

/// Connects to 127.0.0.1:`port` from `from` and returns the reply line and the client's own
/// address: for checking that a frontend's header carried exactly that address.
pub fn ask(from: IpAddr, port: u16) -> Result<(String, SocketAddr), String> {
    let c = ProxyClient::connect(Some(from), SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok((c.reply, c.local))
}
