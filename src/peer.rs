//! The client at the other end of a connection, and how to notice it left.
//!
//! hyper does not read a request body the handler has not asked for, so a
//! client that gives up while its PUT is held would only be noticed when the
//! hold ends. [`Peer::gone`] watches a duplicate of the connection's socket
//! (its own epoll registration, so hyper's readiness is untouched) for the
//! peer's FIN (`EPOLLRDHUP`) without reading a byte, and resolves when it comes.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// One client connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    socket: Option<Arc<OwnedFd>>,
}

impl Peer {
    /// A peer whose departure can be watched, for a TCP connection.
    pub fn watched(address: SocketAddr, socket: &impl AsFd) -> Peer {
        Peer {
            address,
            socket: socket.as_fd().try_clone_to_owned().ok().map(Arc::new),
        }
    }

    /// A peer that is never seen to leave (a connection we cannot watch).
    pub fn unwatched(address: SocketAddr) -> Peer {
        Peer {
            address,
            socket: None,
        }
    }

    /// Resolves once the client has closed its side of the connection.
    /// Never resolves for an unwatched peer or when watching fails.
    pub async fn gone(&self) {
        if let Some(duplicate) = self.register() {
            loop {
                let Ok(ready) = duplicate.ready(Interest::READABLE).await else {
                    break;
                };
                if ready.is_read_closed() {
                    return;
                }
                // Unread request bytes are hyper's: forget this edge without
                // reading and wait for the next one (more data or the FIN).
                let _ = duplicate.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
        std::future::pending::<()>().await
    }

    /// A second handle on the same socket with its own reactor registration.
    fn register(&self) -> Option<TcpStream> {
        let duplicate = self.socket.as_ref()?.as_fd().try_clone_to_owned().ok()?;
        TcpStream::from_std(std::net::TcpStream::from(duplicate)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_client_that_closes_is_seen_gone_even_with_unread_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_side, address) = listener.accept().await.unwrap();
        let peer = Peer::watched(address, &server_side);
        client.write_all(b"PUT /b/k HTTP/1.1\r\n").await.unwrap();
        let watcher = tokio::spawn(async move { peer.gone().await });
        tokio::task::yield_now().await;
        assert!(!watcher.is_finished());
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
            .await
            .expect("the departure is seen")
            .unwrap();
    }
}
