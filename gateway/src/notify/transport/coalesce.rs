//! A connection's writes held back while a burst of events is written, then sent in one
//! system call.
//!
//! Under load a connection's queue often holds several events when its task runs; writing
//! each with a system call of its own made the socket write the largest cost of a delivery.
//! The transport turns holding on, writes the queued events (the frame encoder writes into
//! [`Coalesce`], which keeps the bytes), turns it off and flushes: one write for the burst.
//! The buffer is released once written, so an idle connection keeps none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Events written in one burst at most.
pub const BURST: usize = 64;

/// Bytes held in one burst at most (a burst ends at the first event past this).
pub const BURST_BYTES: usize = 64 * 1024;

/// An `AsyncWrite` that holds writes while told to.
pub struct Coalesce<S> {
    inner: S,
    held: Vec<u8>,
    /// Bytes of `held` already written.
    written: usize,
    holding: bool,
}

impl<S> Coalesce<S> {
    /// Wraps `inner`, not holding.
    pub fn new(inner: S) -> Coalesce<S> {
        Coalesce { inner, held: Vec::new(), written: 0, holding: false }
    }

    /// Holds writes (`true`) until turned off; held bytes go out at the next write or flush.
    pub fn hold(&mut self, on: bool) {
        self.holding = on;
    }

    /// Bytes held and not yet written.
    pub fn held(&self) -> usize {
        self.held.len() - self.written
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes what is held; then releases the buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.held.capacity() > 0 {
            self.held = Vec::new();
            self.written = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.holding {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Records each write call it gets.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl AsyncWrite for Calls {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn held_writes_go_out_in_one_call_in_order_and_the_buffer_is_released() {
        let mut c = Coalesce::new(Calls::default());
        c.write_all(b"a").await.unwrap();
        c.hold(true);
        c.write_all(b"b").await.unwrap();
        c.write_all(b"cd").await.unwrap();
        assert_eq!(c.held(), 3);
        assert_eq!(c.inner.0, vec![b"a".to_vec()], "nothing written while holding");
        c.hold(false);
        c.flush().await.unwrap();
        assert_eq!(c.inner.0, vec![b"a".to_vec(), b"bcd".to_vec()]);
        assert_eq!(c.held(), 0);
        assert_eq!(c.held.capacity(), 0, "no buffer kept between bursts");
        // Held bytes written before a later write that is not held.
        c.hold(true);
        c.write_all(b"e").await.unwrap();
        c.hold(false);
        c.write_all(b"f").await.unwrap();
        assert_eq!(c.inner.0.concat(), b"abcdef".to_vec());
    }
}
