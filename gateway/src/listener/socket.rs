//! A client connection's socket, with a write timeout: a client that stops reading (its
//! receive window stays full) is cut once a write has made no progress for `write_timeout`
//! — on every transport, since WebSocket, SSE and long-poll all write through it — and
//! within [`WRITE_TIMEOUT_DRAINING`] once the node is shutting down, so a stuck client
//! neither holds its per-user connection slot nor the shutdown's grace period.

use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// The write timeout once the node is shutting down.
pub const WRITE_TIMEOUT_DRAINING: Duration = Duration::from_secs(2);

/// A TCP connection whose writes time out (see the module docs).
pub struct Socket {
    stream: TcpStream,
    timeout: Duration,
    shutdown: CancellationToken,
    /// Since when a write has been waiting, and the timer that ends the wait: armed only
    /// while a write is blocked, so an idle connection carries no timer.
    stuck: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl Socket {
    /// Wraps `stream`; writes blocked for `timeout` (or [`WRITE_TIMEOUT_DRAINING`] after
    /// `shutdown`) fail with `TimedOut`.
    pub fn new(stream: TcpStream, timeout: Duration, shutdown: CancellationToken) -> Socket {
        Socket { stream, timeout, shutdown, stuck: None }
    }

    /// A write made progress (or failed): no longer stuck.
    fn progressed<T>(&mut self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stuck = None;
        }
        result
    }

    /// A write is blocked: waits, or fails once blocked too long.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = if self.shutdown.is_cancelled() { self.timeout.min(WRITE_TIMEOUT_DRAINING) } else { self.timeout };
        let now = Instant::now();
        let (since, sleep) = self.stuck.get_or_insert_with(|| (now, Box::pin(tokio::time::sleep(limit))));
        let deadline = *since + limit;
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stuck = None;
                metrics::counter!("quickim_write_timeouts_total").increment(1);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Deref for Socket {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Socket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx),
            ready => self.progressed(ready),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx),
            ready => self.progressed(ready),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Pending => self.blocked(cx),
            ready => self.progressed(ready),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.stream).poll_shutdown(cx) {
            Poll::Pending => self.blocked(cx),
            ready => self.progressed(ready),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair(timeout: Duration, shutdown: CancellationToken) -> (Socket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Socket::new(server, timeout, shutdown), client)
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_cut_and_a_reading_one_is_not() {
        let (mut socket, client) = pair(Duration::from_millis(300), CancellationToken::new()).await;
        let chunk = vec![7u8; 64 * 1024];
        let started = Instant::now();
        let err = loop {
            if let Err(e) = socket.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(client);

        // A client that reads, however slowly, keeps the connection.
        let (mut socket, mut client) = pair(Duration::from_millis(300), CancellationToken::new()).await;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0;
            while total < 8 * 1024 * 1024 {
                match tokio::io::AsyncReadExt::read(&mut client, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            total
        });
        for _ in 0..128 {
            socket.write_all(&chunk).await.unwrap();
        }
        drop(socket);
        assert_eq!(reader.await.unwrap(), 8 * 1024 * 1024);
    }

    #[tokio::test]
    async fn shutdown_shortens_the_wait() {
        let shutdown = CancellationToken::new();
        let (mut socket, _client) = pair(Duration::from_secs(60), shutdown.clone()).await;
        shutdown.cancel();
        let started = Instant::now();
        let chunk = vec![7u8; 64 * 1024];
        let err = loop {
            if let Err(e) = socket.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= WRITE_TIMEOUT_DRAINING && took < WRITE_TIMEOUT_DRAINING * 3, "{took:?}");
    }
}
