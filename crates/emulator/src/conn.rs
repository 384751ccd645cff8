//! Connections a fault can reset: a listener whose streams carry a switch that turns the next
//! write into a TCP reset (`Fault::Reset`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

// Connections that a handler can reset (Fault::Reset)

/// A TCP listener whose connections carry a reset switch.
pub(crate) struct ResetListener(pub(crate) TcpListener);

impl Listener for ResetListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let io = ResettableStream {
                        inner: stream,
                        reset: Arc::new(AtomicBool::new(false)),
                    };
                    return (io, addr);
                }
                Err(e) => {
                    // Typically out of file descriptors: wait instead of spinning.
                    warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The reset switch of the connection a request came on (a handler's `ConnectInfo`).
#[derive(Clone)]
pub(crate) struct ResetSwitch(pub(crate) Arc<AtomicBool>);

impl ResetSwitch {
    /// From now on the connection refuses every read and write, so the server drops it; with
    /// `SO_LINGER` 0 the close is a TCP RST and the client gets no answer.
    pub(crate) fn reset(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Connected<IncomingStream<'_, ResetListener>> for ResetSwitch {
    fn connect_info(stream: IncomingStream<'_, ResetListener>) -> Self {
        ResetSwitch(stream.io().reset.clone())
    }
}

pub(crate) struct ResettableStream {
    pub(crate) inner: TcpStream,
    pub(crate) reset: Arc<AtomicBool>,
}

impl ResettableStream {
    pub(crate) fn check(&self) -> io::Result<()> {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "emulator fault: connection reset",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

    use serde_json::json;

    use crate::testkit::*;
    use crate::{EmulatorOptions, Fault, FaultOp};

    #[tokio::test]
    async fn fault_reset_drops_the_connection() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu.inject_fault(FaultOp::Pull, Fault::Reset);
        let err = h
            .http
            .post(h.url("q", "/pull"))
            .bearer_auth(TOKEN)
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect_err("no answer");
        assert!(!err.is_timeout(), "{err}");
        assert!(err.status().is_none(), "{err}");
        assert_eq!(h.emu.stats("q").deliveries, 0);
        // The server goes on; the next call (on a new connection) is served.
        assert_eq!(h.pull_messages("q", json!({})).await.len(), 1);
    }
}
