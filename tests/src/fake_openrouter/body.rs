//! Response bodies that know whether they were delivered, so the fake can tell when the
//! client (orproxy) went away early.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use super::server::Shared;

/// Sets [`crate::RecordedRequest::disconnected`] when dropped before [`Self::finish`]: hyper
/// drops the service future or the response body exactly when the client goes away.
pub(crate) struct DisconnectGuard {
    shared: Arc<Shared>,
    index: Option<usize>,
    finished: bool,
}

impl DisconnectGuard {
    pub(crate) fn new(shared: Arc<Shared>, index: Option<usize>) -> DisconnectGuard {
        DisconnectGuard {
            shared,
            index,
            finished: false,
        }
    }

    /// The response is complete from the fake's side (including aborts the fake chose).
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if let (false, Some(index)) = (self.finished, self.index) {
            self.shared.mark_disconnected(index);
        }
    }
}

/// What a streaming producer hands to the body.
pub(crate) enum Msg {
    Data(Bytes),
    /// The final frame: the response counts as delivered once hyper takes it, even if the
    /// client hangs up before the producer task has finished.
    Last(Bytes),
    /// End the body with an error, which makes hyper drop the connection without the
    /// chunked terminator.
    Abort,
}

enum Kind {
    Full(Option<Bytes>),
    Frames {
        frames: Arc<[Bytes]>,
        next: usize,
    },
    Channel {
        rx: mpsc::Receiver<Msg>,
        abort_armed: bool,
        ended: bool,
    },
}

/// The one body type every fake response uses.
pub(crate) struct FakeBody {
    kind: Kind,
    guard: DisconnectGuard,
}

impl FakeBody {
    /// A fixed body sent with `Content-Length`.
    pub(crate) fn full(bytes: Bytes, mut guard: DisconnectGuard) -> FakeBody {
        if bytes.is_empty() {
            // hyper never polls a body that is already at its end, so finish here.
            guard.finish();
            return FakeBody {
                kind: Kind::Full(None),
                guard,
            };
        }
        FakeBody {
            kind: Kind::Full(Some(bytes)),
            guard,
        }
    }

    /// Precomputed frames sent chunked, one frame per event, without a producer task.
    pub(crate) fn frames(frames: Arc<[Bytes]>, mut guard: DisconnectGuard) -> FakeBody {
        if frames.is_empty() {
            guard.finish();
        }
        FakeBody {
            kind: Kind::Frames { frames, next: 0 },
            guard,
        }
    }

    /// Frames produced by a task; each message becomes one chunk as soon as it is sent.
    pub(crate) fn channel(rx: mpsc::Receiver<Msg>, guard: DisconnectGuard) -> FakeBody {
        FakeBody {
            kind: Kind::Channel {
                rx,
                abort_armed: false,
                ended: false,
            },
            guard,
        }
    }
}

type FrameResult = Option<Result<Frame<Bytes>, io::Error>>;

impl Body for FakeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FrameResult> {
        let this = self.get_mut();
        let (poll, done) = match &mut this.kind {
            Kind::Full(data) => (Poll::Ready(data.take().map(|b| Ok(Frame::data(b)))), true),
            Kind::Frames { frames, next } => match frames.get(*next) {
                Some(frame) => {
                    *next += 1;
                    let last = *next == frames.len();
                    (Poll::Ready(Some(Ok(Frame::data(frame.clone())))), last)
                }
                None => (Poll::Ready(None), true),
            },
            Kind::Channel {
                rx,
                abort_armed,
                ended,
            } => {
                if *ended {
                    (Poll::Ready(None), true)
                } else if *abort_armed {
                    let err = io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "fake upstream cut the stream",
                    );
                    (Poll::Ready(Some(Err(err))), true)
                } else {
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(Msg::Data(bytes))) => {
                            (Poll::Ready(Some(Ok(Frame::data(bytes)))), false)
                        }
                        Poll::Ready(Some(Msg::Last(bytes))) => {
                            *ended = true;
                            (Poll::Ready(Some(Ok(Frame::data(bytes)))), true)
                        }
                        Poll::Ready(Some(Msg::Abort)) => {
                            // Report Pending once first: hyper flushes what it buffered when
                            // the body is pending, but drops the buffer on a body error.
                            *abort_armed = true;
                            cx.waker().wake_by_ref();
                            (Poll::Pending, false)
                        }
                        Poll::Ready(None) => (Poll::Ready(None), true),
                        Poll::Pending => (Poll::Pending, false),
                    }
                }
            }
        };
        if done {
            this.guard.finish();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Frames { frames, next } => *next >= frames.len(),
            Kind::Channel { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}
