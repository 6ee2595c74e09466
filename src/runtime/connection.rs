//! One interactive-mode connection to a runtime socket: it owns the stream and the read buffer,
//! and turns bytes into whole answers with [`parse_frame_from`]. It knows nothing of what the
//! answers mean and sets no timeouts itself ([`super::RuntimeClient`] wraps every call).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{Error, Result};
use super::parse::{parse_frame_from, resume_point, Frame};

/// Where a runtime API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `stats socket /run/haproxy/admin.sock`
    Unix(PathBuf),
    /// `stats socket ipv4@127.0.0.1:9999`
    Tcp(SocketAddr),
}

impl Endpoint {
    /// Reads the forms HAProxy's own config uses: a path, `unix@PATH`, `ipv4@IP:PORT`,
    /// `ipv6@[IP]:PORT`, `tcp://IP:PORT`, or a bare `IP:PORT`.
    pub fn parse(s: &str) -> Endpoint {
        if let Some(p) = s.strip_prefix("unix@") {
            return Endpoint::Unix(PathBuf::from(p));
        }
        let tcp = s
            .strip_prefix("ipv4@")
            .or_else(|| s.strip_prefix("ipv6@"))
            .or_else(|| s.strip_prefix("tcp://"))
            .unwrap_or(s);
        match tcp.parse::<SocketAddr>() {
            Ok(addr) => Endpoint::Tcp(addr),
            Err(_) => Endpoint::Unix(PathBuf::from(s)),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

/// A byte stream a [`Connection`] can run over: a Unix or TCP socket, or an in-memory pipe in
/// tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The longest prompt we accept from the handshake (`> `, `master> `, a pid and `> `).
const MAX_PROMPT: usize = 32;

/// An open connection in interactive mode.
pub struct Connection {
    stream: Box<dyn Io>,
    buf: Vec<u8>,
    /// Where the next frame search resumes in `buf` (bytes before it hold no terminator).
    scanned: usize,
    prompt: Vec<u8>,
    endpoint: String,
    max_answer: usize,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("endpoint", &self.endpoint)
            .field("prompt", &String::from_utf8_lossy(&self.prompt))
            .finish()
    }
}

/// Maps `connect()` errors to what an operator can act on.
fn connect_error(endpoint: &Endpoint, e: io::Error) -> Error {
    let name = endpoint.to_string();
    match (endpoint, e.kind()) {
        (Endpoint::Unix(_), io::ErrorKind::NotFound) => Error::SocketNotFound { endpoint: name },
        (_, io::ErrorKind::PermissionDenied) => Error::PermissionDenied { endpoint: name },
        // A path that exists but is no listening socket (a plain file, a directory, a stale
        // socket file left by a dead HAProxy).
        (Endpoint::Unix(p), io::ErrorKind::ConnectionRefused) => {
            let what = match std::fs::metadata(p) {
                Ok(m) if m.is_file() => "it is a regular file, not a socket",
                Ok(m) if m.is_dir() => "it is a directory, not a socket",
                _ => "nothing listens on it (a stale socket file? is HAProxy running?)",
            };
            Error::NotHaproxy {
                endpoint: name,
                detail: what.to_string(),
            }
        }
        _ => Error::Connect {
            endpoint: name,
            source: e,
        },
    }
}

impl Connection {
    /// Connects and switches the session to interactive mode.
    pub async fn open(endpoint: &Endpoint, max_answer: usize) -> Result<Connection> {
        let stream: Box<dyn Io> = match endpoint {
            Endpoint::Unix(path) => {
                // connect() on a regular file says ECONNREFUSED, which reads like "HAProxy is
                // down"; look first so the error says what the path really is.
                if let Ok(m) = std::fs::metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !m.file_type().is_socket() {
                        return Err(connect_error(
                            endpoint,
                            io::Error::from(io::ErrorKind::ConnectionRefused),
                        ));
                    }
                }
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| connect_error(endpoint, e))?;
                Box::new(s)
            }
            Endpoint::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| connect_error(endpoint, e))?;
                s.set_nodelay(true).ok();
                Box::new(s)
            }
        };
        Connection::handshake(stream, endpoint.to_string(), max_answer).await
    }

    /// Sends `prompt` over an already connected stream and learns the prompt HAProxy uses.
    pub async fn handshake(
        mut stream: Box<dyn Io>,
        endpoint: String,
        max_answer: usize,
    ) -> Result<Connection> {
        let io_err = |e| Error::Io {
            endpoint: endpoint.clone(),
            what: "`prompt`".into(),
            source: e,
        };
        if let Err(e) = stream.write_all(b"prompt\n").await {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Error::NotHaproxy {
                    endpoint,
                    detail: "it closed the connection without answering `prompt`".into(),
                },
                _ => io_err(e),
            });
        }
        let mut buf = Vec::with_capacity(64 * 1024);
        // The answer is `\n> ` (worker) or `master> ` (master CLI): read until it ends in `> `.
        loop {
            let n = read_more(&mut stream, &mut buf).await.map_err(io_err)?;
            if n == 0 {
                return Err(Error::NotHaproxy {
                    endpoint,
                    detail: if buf.is_empty() {
                        "it closed the connection without answering `prompt`".into()
                    } else {
                        format!(
                            "it answered {:?} to `prompt` and closed",
                            String::from_utf8_lossy(&buf)
                        )
                    },
                });
            }
            if buf.ends_with(b"> ") {
                break;
            }
            if buf.len() > MAX_PROMPT + 1 || !looks_like_prompt_start(&buf) {
                return Err(Error::NotHaproxy {
                    endpoint,
                    detail: format!(
                        "it answered {:?} to `prompt`",
                        super::error::excerpt(&String::from_utf8_lossy(&buf), 80)
                    ),
                });
            }
        }
        let start = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let prompt = buf[start..].to_vec();
        buf.clear();
        Ok(Connection {
            stream,
            buf,
            scanned: 0,
            prompt,
            endpoint,
            max_answer,
        })
    }

    /// The socket, as errors name it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The prompt HAProxy answered with (`> ` for a worker, `master> ` for the master CLI).
    pub fn prompt(&self) -> &[u8] {
        &self.prompt
    }

    pub fn is_master(&self) -> bool {
        self.prompt.starts_with(b"master")
    }

    /// Writes request lines, each ended by a newline, in one write. A line must not hold a
    /// newline itself ([`super::Command`]s never do).
    pub async fn send_lines(&mut self, lines: &[String], what: &str) -> Result<()> {
        let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            debug_assert!(!line.contains('\n'));
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| self.io_error(what, e))
    }

    /// Takes the first whole answer out of the read buffer, if one is there; otherwise notes
    /// how far the buffer was scanned, so the next look starts there.
    fn buffered_answer(&mut self, what: &str) -> Result<Option<String>> {
        match parse_frame_from(&self.buf, &self.prompt, self.max_answer, self.scanned) {
            Frame::Complete { body_len, consumed } => {
                let body = String::from_utf8_lossy(&self.buf[..body_len]).into_owned();
                self.buf.drain(..consumed);
                self.scanned = 0;
                Ok(Some(body))
            }
            Frame::Invalid(detail) => Err(Error::NotHaproxy {
                endpoint: self.endpoint.clone(),
                detail: format!("answer to {what}: {detail}"),
            }),
            Frame::Partial => {
                self.scanned = resume_point(self.buf.len(), &self.prompt);
                Ok(None)
            }
        }
    }

    /// Reads the next whole answer. `Ok(None)` when HAProxy closed the connection before
    /// sending any of it (HAProxy closes idle CLI sessions after `stats timeout`).
    pub async fn read_answer(&mut self, what: &str) -> Result<Option<String>> {
        loop {
            if let Some(body) = self.buffered_answer(what)? {
                return Ok(Some(body));
            }
            let n = read_more(&mut self.stream, &mut self.buf)
                .await
                .map_err(|e| self.io_error(what, e))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Closed {
                    endpoint: self.endpoint.clone(),
                    what: what.to_string(),
                    received: super::error::excerpt(&String::from_utf8_lossy(&self.buf), 200),
                });
            }
        }
    }

    /// Reads until HAProxy either closes the connection or ends an answer with the prompt, and
    /// returns what came. The master's `reload` ends either way: 2.6 answers nothing and drops
    /// every master CLI connection, 2.7+ write their `Success=1|0` report and close, and 3.1+
    /// refuse a reload while another one's worker starts with a short answer and the prompt,
    /// keeping the connection open.
    pub async fn read_answer_or_close(&mut self, what: &str) -> Result<String> {
        loop {
            if let Some(body) = self.buffered_answer(what)? {
                return Ok(body);
            }
            match read_more(&mut self.stream, &mut self.buf).await {
                Ok(0) => break,
                Ok(_) => {}
                // A reset is how the old master goes away; what arrived before it still counts.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(self.io_error(what, e)),
            }
        }
        let rest = std::mem::take(&mut self.buf);
        self.scanned = 0;
        Ok(String::from_utf8_lossy(&rest).into_owned())
    }

    fn io_error(&self, what: &str, e: io::Error) -> Error {
        Error::Io {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            source: e,
        }
    }
}

/// The first bytes of a prompt answer: optional newline, then printable ASCII.
fn looks_like_prompt_start(buf: &[u8]) -> bool {
    let body = buf.strip_prefix(b"\n").unwrap_or(buf);
    body.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
}

async fn read_more(stream: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    stream.read_buf(buf).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            Endpoint::parse("/run/haproxy/admin.sock"),
            Endpoint::Unix("/run/haproxy/admin.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix@/tmp/x"),
            Endpoint::Unix("/tmp/x".into())
        );
        assert_eq!(
            Endpoint::parse("ipv4@127.0.0.1:9999"),
            Endpoint::Tcp("127.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(
            Endpoint::parse("127.0.0.1:9999"),
            Endpoint::Tcp("127.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(
            Endpoint::parse("ipv6@[::1]:9999"),
            Endpoint::Tcp("[::1]:9999".parse().unwrap())
        );
    }

    /// A scripted peer: answers `prompt` with `greeting`, then each request line with the
    /// matching canned answer, split into small writes to exercise partial reads.
    async fn scripted(greeting: &'static [u8], answers: Vec<&'static [u8]>) -> Connection {
        let (client, mut server) = duplex(1024);
        tokio::spawn(async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            // prompt
            while server.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {}
            server.write_all(greeting).await.ok();
            for a in answers {
                line.clear();
                while server.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                for chunk in a.chunks(3) {
                    server.write_all(chunk).await.ok();
                }
            }
        });
        Connection::handshake(Box::new(client), "test".into(), 1 << 20)
            .await
            .unwrap()
    }

    /// A master CLI peer for `reload`: after the handshake it sends `reply` in small writes,
    /// then closes if `close`, else holds the connection open until the client goes.
    async fn reload_peer(reply: &'static [u8], close: bool) -> Connection {
        let (client, mut server) = duplex(1024);
        tokio::spawn(async move {
            let mut byte = [0u8; 1];
            while server.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {}
            server.write_all(b"\nmaster> ").await.ok();
            while server.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {}
            for chunk in reply.chunks(3) {
                server.write_all(chunk).await.ok();
            }
            if !close {
                let mut sink = Vec::new();
                let _ = server.read_to_end(&mut sink).await;
            }
        });
        Connection::handshake(Box::new(client), "test".into(), 1 << 20)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_reload_answer_ends_at_the_close_or_at_a_prompt() {
        let within = std::time::Duration::from_secs(5);
        for (reply, close, want) in [
            // 2.6: nothing, the master re-executes and drops the connection.
            (&b""[..], true, ""),
            // 2.7+: the report, then the close.
            (
                b"Success=1\n--\n[NOTICE] ...\n\n",
                true,
                "Success=1\n--\n[NOTICE] ...\n\n",
            ),
            // 3.1+ refusing while another reload's worker starts: an answer and the prompt,
            // the connection left open (so waiting for the close would never end).
            (
                b"Success=0\n--\nAnother reload is still in progress.\n\nmaster> ",
                false,
                "Success=0\n--\nAnother reload is still in progress.\n\n",
            ),
        ] {
            let mut c = reload_peer(reply, close).await;
            c.send_lines(&["reload".into()], "`reload`").await.unwrap();
            let got = tokio::time::timeout(within, c.read_answer_or_close("`reload`"))
                .await
                .expect("the answer ends without waiting for a close")
                .unwrap();
            assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn reads_answers_split_in_small_chunks() {
        let mut c = scripted(
            b"\n> ",
            vec![b"No such server.\n\n> ", b"# name\nbe_1\n\n> ", b"\n> "],
        )
        .await;
        assert_eq!(c.prompt(), b"> ");
        let lines = ["set server a/b state ready".into(), "show backend".into()];
        c.send_lines(&lines, "t").await.unwrap();
        assert_eq!(
            c.read_answer("t").await.unwrap().unwrap(),
            "No such server.\n\n"
        );
        assert_eq!(
            c.read_answer("t").await.unwrap().unwrap(),
            "# name\nbe_1\n\n"
        );
        c.send_lines(&["x".into()], "t").await.unwrap();
        assert_eq!(c.read_answer("t").await.unwrap().unwrap(), "\n");
        // The peer is gone now: EOF with nothing received.
        assert_eq!(c.read_answer("t").await.unwrap(), None);
    }

    #[tokio::test]
    async fn master_prompt_is_learned() {
        let mut c = scripted(b"master> ", vec![b"#<PID> <type>\n\nmaster> "]).await;
        assert!(c.is_master());
        c.send_lines(&["show proc".into()], "t").await.unwrap();
        assert_eq!(
            c.read_answer("t").await.unwrap().unwrap(),
            "#<PID> <type>\n\n"
        );
    }

    #[tokio::test]
    async fn not_haproxy_peers() {
        for greeting in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH\r\n",
        ] {
            let (client, mut server) = duplex(1024);
            let g = greeting.to_vec();
            tokio::spawn(async move {
                server.write_all(&g).await.ok();
            });
            let err = Connection::handshake(Box::new(client), "t".into(), 1024)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::NotHaproxy { .. }), "{err}");
        }
        let (client, server) = duplex(1024);
        drop(server);
        let err = Connection::handshake(Box::new(client), "t".into(), 1024)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("without answering"), "{err}");
    }

    #[tokio::test]
    async fn eof_mid_answer_keeps_what_arrived() {
        let (client, mut server) = duplex(1024);
        tokio::spawn(async move {
            let mut b = [0u8; 7];
            server.read_exact(&mut b).await.ok();
            server.write_all(b"\n> ").await.ok();
            let mut b = [0u8; 10];
            server.read_exact(&mut b).await.ok();
            server.write_all(b"# pxname,sv").await.ok();
        });
        let mut c = Connection::handshake(Box::new(client), "t".into(), 1024)
            .await
            .unwrap();
        c.send_lines(&["show stat".into()], "show stat")
            .await
            .unwrap();
        let err = c.read_answer("show stat").await.unwrap_err();
        assert!(matches!(err, Error::Closed { .. }));
        assert!(err.to_string().contains("# pxname,sv"), "{err}");
    }
}
