//! The connections Flight SQL clients open, each known by an id of its own: a request finds its
//! connection's session by that id ([`ConnectionInfo`] in the request's extensions), and when a
//! connection closes its session goes with it (a new connection from the same port is a new
//! session). Accepted connections send without Nagle's delay: a Flight SQL call is a few small
//! frames each way, and waiting for the peer's delayed acknowledgement would add ~40 ms to
//! every call.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

use super::sessions::Sessions;

/// What a request knows of the connection it came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    /// Unique among the server's connections.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
}

/// An accepted connection; closing it ends its sessions.
pub struct Connection {
    stream: TcpStream,
    info: ConnectionInfo,
    sessions: Arc<Sessions>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.sessions.close(self.info.id);
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, numbered, without Nagle's delay. A failed accept (too
/// many open files, say) is passed on after a short pause, so that it cannot spin the loop.
pub fn accept(listener: TcpListener, sessions: Arc<Sessions>) -> impl Stream<Item = io::Result<Connection>> {
    futures::stream::unfold((listener, 0u64), move |(listener, next_id)| {
        let sessions = sessions.clone();
        async move {
            let accepted = match listener.accept().await {
                Ok((stream, peer)) => stream.set_nodelay(true).map(|_| Connection {
                    stream,
                    info: ConnectionInfo { id: next_id, peer },
                    sessions,
                }),
                Err(e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(e)
                }
            };
            Some((accepted, (listener, next_id + 1)))
        }
    })
}
