//! A client connection whose writes fail once they have been blocked for too long.
//!
//! hyper bounds how long a client takes to send a request's head, not how long it takes to
//! read the answer: a client that stops reading would hold its connection, its stream relay
//! and the upstream request behind it forever. Wrapped in [`WriteStall`], a write that cannot
//! proceed for `limits.client_timeout` fails, hyper closes the connection, and the relay sees
//! the client gone (the upstream request is cancelled and the row records it).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An I/O stream whose writes, flushes and shutdown fail after being blocked for `limit`.
#[derive(Debug)]
pub struct WriteStall<T> {
    io: T,
    limit: Duration,
    /// Reset at each stall (cheaper than a new timer each time).
    timer: Pin<Box<Sleep>>,
    /// Whether a write is blocked now, `timer` then running for it.
    stalled: bool,
}

impl<T> WriteStall<T> {
    /// Wraps `io` (inside a tokio runtime: the timer is made here).
    pub fn new(io: T, limit: Duration) -> Self {
        WriteStall {
            io,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            stalled: false,
        }
    }

    /// Passes a write's result through, turning a wait longer than the limit into an error.
    fn watch<R>(
        &mut self,
        result: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Ready(result) => {
                // A timer left running wakes the connection once for nothing; hyper polls
                // again and finds nothing to do.
                self.stalled = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                // A stall already timed keeps its deadline; a new one starts the clock.
                if !self.stalled {
                    self.timer.as_mut().reset(Instant::now() + self.limit);
                    self.stalled = true;
                }
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading (limits.client_timeout)",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(result, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_past_the_limit_fails_and_one_that_proceeds_does_not() {
        // A pipe whose reader reads nothing: the writer blocks once 64 bytes are buffered.
        let (client, _server) = tokio::io::duplex(64);
        let mut stalled = WriteStall::new(client, Duration::from_secs(1));
        stalled.write_all(&[0; 64]).await.unwrap();
        let error = stalled.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        // A reader that keeps up, however slowly, never trips it.
        let (client, mut reader) = tokio::io::duplex(64);
        let mut slow = WriteStall::new(client, Duration::from_secs(1));
        let drain = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 640 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                total += reader.read(&mut buf).await.unwrap();
            }
        });
        slow.write_all(&[0; 640]).await.unwrap();
        drain.await.unwrap();
    }
}
