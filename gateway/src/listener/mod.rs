//! The listeners: accepting connections and reading them, for both the public and the
//! /inner router (`crate::http` builds those).
//!
//! Every connection is served by hyper, except the ones whose requests are `/notify`
//! streams: those are parked for minutes or hours, and hyper keeps about 24 KiB of buffers
//! per connection (an 8 KiB+ read buffer, an 8 KiB header write buffer) however quiet it is.
//! So the public listener reads each connection's request head itself: a bodiless HTTP/1.1
//! `GET /notify?protoc=ws|sse|poll` is answered here, through the same router (so
//! authentication, CORS, tracing and metrics are the same), with its response written
//! straight to the socket — `Content-Length` for long-poll answers, chunked for event
//! streams, and for a WebSocket handshake the `101` after which the handler's
//! [`Switch`] runs the socket — and the connection kept alive for the next poll. Anything
//! else hands the connection, with the bytes already read, to hyper. An idle stream then
//! costs its session and little more.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;

use socket::Socket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The longest request head read here (a longer one goes to hyper, which answers 431).
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed here (more: hyper's business).
const MAX_HEADERS: usize = 32;
/// How long a connection may stay idle between requests (and before its first).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes a client may send ahead while its stream is open (a pipelined next request).
const MAX_AHEAD: usize = 16 * 1024;
/// Bytes of a later body gathered before its head is written (see `write_response`).
const READY_BYTES: usize = 256 * 1024;

pub mod socket;

/// The address a request came from (in every request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::IpAddr);

/// What runs a connection after a `101 Switching Protocols`: the socket and any bytes the
/// client sent after its request head.
type TakeoverFn = Box<dyn FnOnce(Socket, Vec<u8>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A connection handed over after a `101 Switching Protocols`, whichever path served the
/// request: the listener's own socket, or hyper's upgraded connection.
pub enum Conn {
    /// Served on the listener's own path.
    Socket(Socket),
    /// Upgraded by hyper.
    Upgraded(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
}

/// How a request may switch protocols — the one way a handler gets the connection after
/// answering `101`, whoever served the request.
pub struct Switch(SwitchKind);

enum SwitchKind {
    Lean(Takeover),
    Hyper(hyper::upgrade::OnUpgrade, TaskTracker),
}

impl Switch {
    /// The request's way to switch, if it has one; connections upgraded through hyper run
    /// in `tracker` (the server does not wait for them itself).
    pub fn of(parts: &mut axum::http::request::Parts, tracker: &TaskTracker) -> Option<Switch> {
        if let Some(t) = parts.extensions.remove::<Takeover>() {
            return Some(Switch(SwitchKind::Lean(t)));
        }
        let upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        Some(Switch(SwitchKind::Hyper(upgrade, tracker.clone())))
    }

    /// Runs `f` on the connection, and the bytes the client sent after its request head,
    /// once the `101` is written.
    pub fn run<F>(self, f: impl FnOnce(Conn, Vec<u8>) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.0 {
            SwitchKind::Lean(takeover) => {
                takeover.claim(Box::new(move |socket, ahead| Box::pin(f(Conn::Socket(socket), ahead))))
            }
            SwitchKind::Hyper(upgrade, tracker) => {
                tracker.spawn(async move {
                    if let Ok(upgraded) = upgrade.await {
                        f(Conn::Upgraded(hyper_util::rt::TokioIo::new(upgraded)), Vec::new()).await;
                    }
                });
            }
        }
    }
}

macro_rules! conn_delegate {
    ($self:ident, $inner:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Socket($inner) => {
                let $inner = Pin::new($inner);
                $e
            }
            Conn::Upgraded($inner) => {
                let $inner = Pin::new($inner);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        conn_delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        conn_delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        conn_delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Socket(s) => s.is_write_vectored(),
            Conn::Upgraded(u) => u.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        conn_delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        conn_delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// In the extensions of every request served on the lean path: a response body that ends
/// after the data it has ready when first polled is written with a `Content-Length` (hyper
/// would stream such a body in chunks), so a long-poll may wait inside its body.
#[derive(Clone, Copy)]
pub struct Lean;

/// In the extensions of a request served on the lean path that may switch protocols: a
/// handler answering `101` claims the connection here, through [`Switch`]. (Requests served
/// by hyper carry hyper's `OnUpgrade` instead.)
#[derive(Clone, Default)]
struct Takeover(Arc<Mutex<Option<TakeoverFn>>>);

impl Takeover {
    /// Runs `f` on the connection once the `101` answer is written.
    fn claim(&self, f: TakeoverFn) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(f);
        }
    }

    fn take(&self) -> Option<TakeoverFn> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// How a listener treats its connections.
#[derive(Clone)]
pub struct Limits {
    /// A write that makes no progress this long closes the connection.
    pub write_timeout: Duration,
    /// A request head must be complete this long after its first byte.
    pub header_timeout: Duration,
    /// New connections per IP address (none: unlimited).
    pub per_ip: Option<Arc<crate::ratelimit::RateLimiter>>,
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting and waits for the
/// open connections to finish (their streams close on the same signal). `lean_notify`:
/// serve SSE and long-poll `/notify` requests directly (the public listener). A new
/// connection over its IP address's rate is answered 429 and closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    lean_notify: bool,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Some(limiter) = &limits.per_ip
                        && let Err(wait) = limiter.check_ip(peer.ip())
                    {
                        metrics::counter!("quickim_connections_refused_total", "reason" => "ip_rate").increment(1);
                        connections.spawn(refuse(stream, wait));
                        continue;
                    }
                    stream
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: give connections time to close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().map(|a| a.ip()).unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        let stream = Socket::new(stream, limits.write_timeout, shutdown.clone());
        connections.spawn(connection(
            stream,
            peer,
            router.clone(),
            lean_notify,
            limits.header_timeout,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Answers a connection over its address's rate: 429 `too_many_connections_from_ip`.
async fn refuse(mut stream: tokio::net::TcpStream, wait: u64) {
    let body = format!(
        r#"{{"code":{},"error":"too many new connections from this address"}}"#,
        quickim_shared::error::ErrorCode::TooManyConnectionsFromIp.number()
    );
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: {wait}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(answer.as_bytes())).await;
    let _ = stream.shutdown().await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    mut stream: Socket,
    peer: std::net::IpAddr,
    router: Router,
    lean_notify: bool,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut pending = BytesMut::new();
    if lean_notify {
        loop {
            // Boxed: the connection's own future stays small while a stream is open.
            let head = Box::pin(read_head(&mut stream, &mut pending, header_timeout, &shutdown)).await;
            match head {
                Head::Lean(mut request, keep_alive) => {
                    request.extensions_mut().insert(Peer(peer));
                    match Box::pin(answer(&mut stream, &router, *request, &mut pending, keep_alive)).await {
                        Ok(Outcome::Next) if keep_alive && !shutdown.is_cancelled() => continue,
                        Ok(Outcome::Takeover(run)) => {
                            let ahead = std::mem::take(&mut pending).to_vec();
                            return run(stream, ahead).await;
                        }
                        Ok(Outcome::Next) | Err(_) => {
                            let _ = stream.shutdown().await;
                            return;
                        }
                    }
                }
                Head::Other => break,
                Head::Closed => return,
            }
        }
    }
    // Boxed: hyper's connection state would otherwise sit inline in every lean connection's task.
    Box::pin(hyper_connection(Rewind { ahead: pending.freeze(), stream }, peer, router, header_timeout, shutdown))
        .await;
}

/// Serves the rest of a connection with hyper.
async fn hyper_connection(
    io: Rewind,
    peer: std::net::IpAddr,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let service = TowerToHyperService::new(router.map_request(move |mut r: Request<hyper::body::Incoming>| {
        r.extensions_mut().insert(Peer(peer));
        r
    }));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::trace!(error = %e, "connection failed");
            }
            return;
        }
        _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::trace!(error = %e, "connection failed");
    }
}

enum Head {
    /// A request served here (and whether the connection may stay open after it).
    Lean(Box<Request<Body>>, bool),
    /// Anything else: hyper's (with the bytes read so far).
    Other,
    /// The client left, stayed silent too long, or the server is stopping between requests.
    Closed,
}

/// Reads the next request head into `pending` and decides who serves it. A connection may
/// stay idle for [`IDLE_TIMEOUT`]; once a head has begun it must be complete within
/// `header_timeout` (a slow-header client is cut).
async fn read_head(
    stream: &mut Socket,
    pending: &mut BytesMut,
    header_timeout: Duration,
    shutdown: &CancellationToken,
) -> Head {
    let mut deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    let mut begun = !pending.is_empty();
    if begun {
        deadline = tokio::time::Instant::now() + header_timeout;
    }
    loop {
        if !pending.is_empty() {
            // Decide on the request line alone where possible: most requests are not ours.
            if let Some(line_end) = pending.iter().position(|b| *b == b'\n') {
                if !is_lean_request_line(&pending[..line_end]) {
                    return Head::Other;
                }
            } else if pending.len() >= 11 && !pending.starts_with(b"GET /notify") {
                return Head::Other;
            }
            match parse(pending) {
                Parsed::Lean(request, keep_alive, len) => {
                    pending.advance(len);
                    if pending.is_empty() {
                        // Give the head's buffer back (the request holds copies).
                        *pending = BytesMut::new();
                    }
                    return Head::Lean(request, keep_alive);
                }
                Parsed::Other => return Head::Other,
                Parsed::Partial if pending.len() >= MAX_HEAD => return Head::Other,
                Parsed::Partial => {}
            }
        }
        if pending.capacity() - pending.len() < 512 {
            pending.reserve(1024);
        }
        let read = tokio::select! {
            read = stream.read_buf(pending) => read,
            _ = tokio::time::sleep_until(deadline) => return Head::Closed,
            _ = shutdown.cancelled(), if pending.is_empty() => return Head::Closed,
        };
        match read {
            Ok(0) | Err(_) => return Head::Closed,
            Ok(_) => {
                if !begun {
                    begun = true;
                    deadline = tokio::time::Instant::now() + header_timeout;
                }
            }
        }
    }
}

/// How the public listener treats bytes that start a request (what its head reader decides;
/// for the fuzzer and tests).
#[derive(Debug)]
pub enum Triage {
    /// Served on the listener's own path: the request, whether the connection stays open
    /// after it, and the head's length.
    Lean(Box<Request<Body>>, bool, usize),
    /// Handed to hyper.
    Other,
    /// More bytes are needed.
    Partial,
}

/// Decides, as the head reader does, who serves a request that starts with `buf`.
pub fn triage(buf: &[u8]) -> Triage {
    if let Some(line_end) = buf.iter().position(|b| *b == b'\n') {
        if !is_lean_request_line(&buf[..line_end]) {
            return Triage::Other;
        }
    } else if buf.len() >= 11 && !buf.starts_with(b"GET /notify") {
        return Triage::Other;
    }
    match parse(buf) {
        Parsed::Lean(request, keep_alive, len) => Triage::Lean(request, keep_alive, len),
        Parsed::Other => Triage::Other,
        Parsed::Partial if buf.len() >= MAX_HEAD => Triage::Other,
        Parsed::Partial => Triage::Partial,
    }
}

fn is_lean_request_line(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(rest) = line.strip_prefix(b"GET ") else { return false };
    let Some(target) = rest.strip_suffix(b" HTTP/1.1") else { return false };
    let Some(query) = target.strip_prefix(b"/notify?") else { return false };
    query.split(|b| *b == b'&').any(|pair| matches!(pair, b"protoc=sse" | b"protoc=poll" | b"protoc=ws"))
}

enum Parsed {
    Lean(Box<Request<Body>>, bool, usize),
    Other,
    Partial,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some("GET"), Some(path), Some(1)) = (req.method, req.path, req.version) else { return Parsed::Other };
    let mut builder = Request::builder().method(Method::GET).uri(path).version(Version::HTTP_11);
    let mut keep_alive = true;
    let mut upgrade = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            if !h.value.eq_ignore_ascii_case(b"websocket") {
                return Parsed::Other;
            }
            upgrade = true;
        }
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || (name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
        {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case("connection")
            && h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            keep_alive = false;
        }
        let Ok(value) = HeaderValue::from_bytes(h.value) else { return Parsed::Other };
        builder = builder.header(name, value);
    }
    if upgrade {
        builder = builder.extension(Takeover::default());
    }
    builder = builder.extension(Lean);
    match builder.body(Body::empty()) {
        Ok(request) => Parsed::Lean(Box::new(request), keep_alive, len),
        Err(_) => Parsed::Other,
    }
}

/// What comes after an answer.
enum Outcome {
    /// The next request (if the connection stays open).
    Next,
    /// The handler switched protocols: it runs the connection now.
    Takeover(TakeoverFn),
}

/// Runs the request through the router and writes the response. The client leaving while
/// the answer is pending cancels it.
async fn answer(
    stream: &mut Socket,
    router: &Router,
    request: Request<Body>,
    pending: &mut BytesMut,
    keep_alive: bool,
) -> io::Result<Outcome> {
    let takeover = request.extensions().get::<Takeover>().cloned();
    let response = {
        let call = router.clone().oneshot(request);
        tokio::pin!(call);
        loop {
            tokio::select! {
                response = &mut call => break response,
                gone = watch(stream, pending) => if gone? {
                    return Err(io::ErrorKind::ConnectionAborted.into());
                },
            }
        }
    };
    let Ok(response) = response;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let run = takeover.and_then(|t| t.take()).ok_or_else(|| io::Error::other("101 without a takeover"))?;
        stream.write_all(&head(&response, true)).await?;
        return Ok(Outcome::Takeover(run));
    }
    write_response(stream, response, pending, keep_alive).await?;
    Ok(Outcome::Next)
}

/// The status line and headers (without the framing headers unless `as_is`).
fn head(response: &Response<Body>, as_is: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(response.status().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(response.status().canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        let framing = name == header::CONNECTION || name == header::TRANSFER_ENCODING || name == header::CONTENT_LENGTH;
        if framing && !as_is {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !response.headers().contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if as_is {
        head.extend_from_slice(b"\r\n");
    }
    head
}

/// Waits for the client to send something: Ok(true) when it closed the connection; bytes it
/// sends ahead are kept in `pending` (up to [`MAX_AHEAD`]).
async fn watch(stream: &mut Socket, pending: &mut BytesMut) -> io::Result<bool> {
    stream.readable().await?;
    let mut buf = [0u8; 512];
    match stream.try_read(&mut buf) {
        Ok(0) => Ok(true),
        Ok(n) if pending.len() + n > MAX_AHEAD => Err(io::Error::other("client sent too much ahead")),
        Ok(n) => {
            pending.extend_from_slice(&buf[..n]);
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes a response (an error when the client left meanwhile).
async fn write_response(
    stream: &mut Socket,
    response: Response<Body>,
    pending: &mut BytesMut,
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = head(&response, false);
    let mut body = response.into_body();
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    }
    if let Some(len) = HttpBody::size_hint(&body).exact() {
        // A whole answer (errors, the rest of the API): one write.
        head.extend_from_slice(format!("content-length: {len}\r\n\r\n").as_bytes());
        let data = body.collect().await.map_err(io::Error::other)?.to_bytes();
        let mut out = Buf::chain(&head[..], data);
        return stream.write_all_buf(&mut out).await;
    }
    // A body that comes later: the first of its data, then whatever else is ready at once (up
    // to READY_BYTES). A body that has ended by then (a long-poll answer, which waits inside
    // its body) is one write with a `Content-Length`; a stream goes on in chunks.
    let mut ready = Vec::new();
    let mut gathered = 0;
    let mut ended = match next_data(&mut body, stream, pending).await? {
        Some(data) => {
            gathered += data.len();
            ready.push(data);
            false
        }
        None => true,
    };
    while !ended {
        match futures::FutureExt::now_or_never(body.frame()) {
            None => break,
            Some(None) => ended = true,
            Some(Some(Err(e))) => return Err(io::Error::other(e)),
            Some(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    gathered += data.len();
                    ready.push(data);
                }
                if gathered >= READY_BYTES {
                    break;
                }
            }
        }
    }
    if ended {
        head.extend_from_slice(format!("content-length: {gathered}\r\n\r\n").as_bytes());
        for data in ready {
            head.extend_from_slice(&data);
        }
        return stream.write_all(&head).await;
    }
    head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    for data in ready {
        head.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        head.extend_from_slice(&data);
        head.extend_from_slice(b"\r\n");
    }
    stream.write_all(&head).await?;
    drop(head);
    while let Some(data) = next_data(&mut body, stream, pending).await? {
        let size = format!("{:x}\r\n", data.len());
        let mut out = Buf::chain(Buf::chain(size.as_bytes(), data), &b"\r\n"[..]);
        stream.write_all_buf(&mut out).await?;
    }
    stream.write_all(b"0\r\n\r\n").await
}

/// The body's next data (`None` at its end), or an error once the client has gone.
async fn next_data(body: &mut Body, stream: &mut Socket, pending: &mut BytesMut) -> io::Result<Option<Bytes>> {
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                }
            },
            gone = watch(stream, pending) => if gone? {
                return Err(io::ErrorKind::ConnectionAborted.into());
            },
        }
    }
}

/// A connection handed to hyper: the bytes already read come first.
struct Rewind {
    ahead: Bytes,
    stream: Socket,
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            if self.ahead.is_empty() {
                // Free the buffer (an upgraded connection keeps this wrapper for its life).
                self.ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sse_and_poll_notify_requests_are_lean() {
        assert!(is_lean_request_line(b"GET /notify?protoc=sse&token=x HTTP/1.1\r"));
        assert!(is_lean_request_line(b"GET /notify?token=x&protoc=poll HTTP/1.1"));
        assert!(is_lean_request_line(b"GET /notify?protoc=ws HTTP/1.1\r"));
        assert!(!is_lean_request_line(b"GET /notify?protoc=wss HTTP/1.1\r"));
        assert!(!is_lean_request_line(b"GET /notify?protoc=sse HTTP/1.0\r"));
        assert!(!is_lean_request_line(b"POST /notify?protoc=sse HTTP/1.1\r"));
        assert!(!is_lean_request_line(b"GET /notifyx?protoc=sse HTTP/1.1\r"));
        assert!(!is_lean_request_line(b"GET /send_msg HTTP/1.1\r"));
    }

    #[test]
    fn heads_with_bodies_or_upgrades_go_to_hyper() {
        let ok = b"GET /notify?protoc=sse HTTP/1.1\r\nHost: x\r\nLast-Event-ID: abc\r\n\r\nGET";
        match parse(ok) {
            Parsed::Lean(r, keep_alive, len) => {
                assert!(keep_alive);
                assert_eq!(len, ok.len() - 3);
                assert_eq!(r.headers()["last-event-id"], "abc");
                assert_eq!(r.uri().query(), Some("protoc=sse"));
            }
            _ => panic!("lean"),
        }
        assert!(matches!(
            parse(b"GET /notify?protoc=poll HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Parsed::Lean(_, false, _)
        ));
        assert!(matches!(parse(b"GET /notify?protoc=sse HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial));
        match parse(b"GET /notify?protoc=ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n") {
            Parsed::Lean(r, _, _) => assert!(r.extensions().get::<Takeover>().is_some(), "a handshake may take over"),
            _ => panic!("lean"),
        }
        for other in [
            &b"GET /notify?protoc=sse HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"GET /notify?protoc=sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /notify?protoc=sse HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"GET /notify?protoc=sse HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert!(matches!(parse(other), Parsed::Other), "{}", String::from_utf8_lossy(other));
        }
    }
}
