//! A connection's first request is read here, before hyper sees the connection: its head, and
//! its body when that is small. hyper gives every connection an 8 KiB read buffer and an 8 KiB
//! write buffer as soon as the first byte arrives, so a slow stranger trickling a head would
//! hold 16 KiB whatever it sent; here it holds a buffer the size of what it has sent. hyper then
//! reads the request from [`Prefixed`], answers it at once, and, as the connection has not
//! authenticated, closes it (see `serve`): a stranger never waits inside hyper, except for a
//! large body that has taken its place in the shared [`super::BodyBudget`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{MAX_FIRST_HEAD, SMALL_BODY};

/// How the first request ended up.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstRequest {
    /// Everything hyper needs to start on the request (or to refuse it: a head that does not
    /// parse is handed over as it is, for hyper's 400).
    Ready(Vec<u8>),
    /// The head is over [`MAX_FIRST_HEAD`]: answered 431 without hyper.
    TooLarge,
    /// The peer closed the connection, or the read failed, or the deadline passed: nothing to
    /// answer.
    Gone,
}

/// Reads until the first request's head is complete (and its body, when its Content-Length is
/// at most [`SMALL_BODY`]), or the head is over [`MAX_FIRST_HEAD`], or `deadline`. While the small
/// body is awaited, the request is in flight: `in_flight` makes what counts it. Once `stop` is
/// cancelled (the server shuts down) a head not yet complete is given up; a request in flight
/// is read on.
pub async fn read_first_request<I: AsyncRead + Unpin, G>(
    io: &mut I,
    deadline: Instant,
    stop: &CancellationToken,
    in_flight: impl FnOnce() -> G,
) -> FirstRequest {
    let mut buf: Vec<u8> = Vec::new();
    // Where the search for the head's end resumes.
    let mut searched = 0;
    let mut want: Option<usize> = None;
    let mut in_flight = Some(in_flight);
    let mut _counted = None;
    loop {
        if let Some(total) = want {
            if buf.len() >= total {
                return FirstRequest::Ready(buf);
            }
        } else if let Some(end) = head_end(&buf, searched) {
            match small_body_length(&buf[..end]) {
                Some(len) => {
                    want = Some(end + len);
                    _counted = in_flight.take().map(|f| f());
                }
                None => return FirstRequest::Ready(buf),
            }
            continue;
        } else if buf.len() >= MAX_FIRST_HEAD {
            return FirstRequest::TooLarge;
        } else {
            searched = buf.len().saturating_sub(3);
        }
        // Room for what may come, grown as it comes: a trickling peer holds what it has sent.
        let limit = want.unwrap_or(MAX_FIRST_HEAD);
        if buf.capacity() == buf.len() {
            // Exact: amortized growth could double past the limit.
            buf.reserve_exact((buf.len().max(512)).min(limit - buf.len()));
        }
        let room = (buf.capacity() - buf.len()).min(limit - buf.len());
        let start = buf.len();
        buf.resize(start + room, 0);
        let read = tokio::time::timeout_at(deadline.into(), io.read(&mut buf[start..]));
        // Biased: bytes already there are read before a shutdown is looked at, so a request
        // whose head has arrived is not dropped by a coin toss.
        let read = tokio::select! {
            biased;
            read = read => read,
            _ = stop.cancelled(), if want.is_none() => return FirstRequest::Gone,
        };
        match read {
            Ok(Ok(n)) if n > 0 => buf.truncate(start + n),
            _ => return FirstRequest::Gone,
        }
    }
}

/// The end of the head (after its blank line) if it is in `buf`, looking from `from` on.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let tail = &buf[from..];
    // httparse, like hyper, also takes bare LF line ends.
    let crlf = memchr::memmem::find(tail, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(tail, b"\n\n").map(|i| i + 2);
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(from + end)
}

/// A `Content-Length` value read as hyper reads it: a comma-separated list of one value,
/// repeated (`2000, 2000`); `None` for anything else, which hyper refuses too. Reading it
/// any other way would let a small body through here as a large one to hyper, or back.
fn content_length(value: &[u8]) -> Option<usize> {
    let mut len = None;
    for part in std::str::from_utf8(value).ok()?.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let v = part.parse::<usize>().ok()?;
        if len.is_some_and(|l| l != v) {
            return None;
        }
        len = Some(v);
    }
    len
}

/// The body length when the head announces a body of at most [`SMALL_BODY`] bytes (0 when
/// none); `None` when it is larger, chunked, or the head does not parse: hyper takes over.
fn small_body_length(head: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut len = 0;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = content_length(h.value)?;
        }
    }
    (len <= SMALL_BODY).then_some(len)
}

/// `io` with bytes already read from it in front.
pub struct Prefixed<I> {
    prefix: Vec<u8>,
    at: usize,
    io: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Vec<u8>, io: I) -> Prefixed<I> {
        Prefixed { prefix, at: 0, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = out.remaining().min(this.prefix.len() - this.at);
            out.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                // Given back at once: a keep-alive connection lives long.
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn first(parts: &[&[u8]]) -> FirstRequest {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        for p in parts {
            client.write_all(p).await.unwrap();
        }
        drop(client);
        read_first_request(
            &mut server,
            Instant::now() + Duration::from_secs(5),
            &CancellationToken::new(),
            || (),
        )
        .await
    }

    #[tokio::test]
    async fn reads_the_head_and_a_small_body_and_stops() {
        let req = b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloNEXT";
        // The body is in; the rest is for hyper to read from the connection.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&req[..20]).await.unwrap();
        let reading = tokio::spawn(async move {
            let r = read_first_request(
                &mut server,
                Instant::now() + Duration::from_secs(5),
                &CancellationToken::new(),
                || (),
            )
            .await;
            (r, server)
        });
        tokio::task::yield_now().await;
        client.write_all(&req[20..]).await.unwrap();
        let (r, _server) = reading.await.unwrap();
        let FirstRequest::Ready(got) = r else {
            panic!("{r:?}")
        };
        assert!(got.starts_with(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"));
        assert!(got.len() <= req.len());
    }

    #[tokio::test]
    async fn hands_over_large_bodies_chunked_oversized_and_broken_heads() {
        let large = b"PUT /x HTTP/1.1\r\nContent-Length: 60000\r\n\r\nabc".as_slice();
        assert_eq!(first(&[large]).await, FirstRequest::Ready(large.to_vec()));
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice();
        assert_eq!(
            first(&[chunked]).await,
            FirstRequest::Ready(chunked.to_vec())
        );
        let broken = b"GARBAGE\r\n\r\n".as_slice();
        assert_eq!(first(&[broken]).await, FirstRequest::Ready(broken.to_vec()));
        let bare_lf = b"GET /healthz HTTP/1.1\nHost: a\n\n".as_slice();
        assert_eq!(
            first(&[bare_lf]).await,
            FirstRequest::Ready(bare_lf.to_vec())
        );
        let huge = vec![b'a'; 3 * MAX_FIRST_HEAD];
        assert_eq!(
            first(&[b"GET / HTTP/1.1\r\nX: ", &huge]).await,
            FirstRequest::TooLarge,
            "stops at the cap"
        );
    }

    #[tokio::test]
    async fn a_peer_that_leaves_or_is_too_slow_is_gone() {
        assert_eq!(first(&[b"GET / HTT"]).await, FirstRequest::Gone);
        let (_client, mut server) = tokio::io::duplex(1024);
        let soon = Instant::now() + Duration::from_millis(20);
        let r = read_first_request(&mut server, soon, &CancellationToken::new(), || ()).await;
        assert_eq!(r, FirstRequest::Gone);
    }

    #[tokio::test]
    async fn a_shutdown_gives_up_heads_but_not_requests_in_flight() {
        let stop = CancellationToken::new();
        stop.cancel();
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTT").await.unwrap();
        let soon = Instant::now() + Duration::from_secs(5);
        let r = read_first_request(&mut server, soon, &stop, || ()).await;
        assert_eq!(r, FirstRequest::Gone);
        let (mut client, mut server) = tokio::io::duplex(1024);
        let req = b"PUT / HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        client.write_all(req).await.unwrap();
        let reading =
            tokio::spawn(async move { read_first_request(&mut server, soon, &stop, || ()).await });
        tokio::task::yield_now().await;
        client.write_all(b"ok").await.unwrap();
        let FirstRequest::Ready(got) = reading.await.unwrap() else {
            panic!()
        };
        assert!(got.ends_with(b"\r\n\r\nok"));
    }

    #[test]
    fn content_length_is_read_as_hyper_reads_it() {
        assert_eq!(content_length(b"2000"), Some(2000));
        assert_eq!(content_length(b"2000, 2000"), Some(2000));
        assert_eq!(content_length(b" 7 "), Some(7));
        for bad in [&b"2000, 3"[..], b"", b"+5", b"-1", b"1e3", b"5,", b"0x10"] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A listed length is a small body read here, not a large one left to hyper.
        let listed = b"PUT /x HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n".as_slice();
        assert_eq!(small_body_length(listed), Some(3));
    }

    #[tokio::test]
    async fn prefixed_reads_the_prefix_first() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut p = Prefixed::new(b"hello".to_vec(), server);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
