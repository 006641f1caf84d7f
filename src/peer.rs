//! The client at the other end of a connection, and how to notice it left.
//!
//! hyper does not read a request body the handler has not asked for, so a
//! client that gives up while its PUT is held would only be noticed when the
//! hold ends. [`Peer::gone`] watches a duplicate of the connection's socket
//! (its own epoll registration, so hyper's readiness is untouched) for the
//! peer's FIN (`EPOLLRDHUP`) without reading a byte, and resolves when it comes.
//! The duplicate is made at accept (so each client connection holds two file
//! descriptors) and registered with the reactor the first time a request on
//! that connection is held; every held request of the connection shares it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// One client connection.
#[derive(Debug)]
pub struct Peer {
    pub address: SocketAddr,
    /// The duplicate, until the first hold registers it.
    duplicate: Mutex<Option<OwnedFd>>,
    registered: OnceLock<Option<TcpStream>>,
}

impl Peer {
    /// A peer whose departure can be watched, for a TCP connection.
    pub fn watched(address: SocketAddr, socket: &impl AsFd) -> Peer {
        Peer {
            address,
            duplicate: Mutex::new(socket.as_fd().try_clone_to_owned().ok()),
            registered: OnceLock::new(),
        }
    }

    /// Resolves once the client has closed its side of the connection.
    /// Never resolves when the socket could not be watched.
    pub async fn gone(&self) {
        if let Some(duplicate) = self.registered() {
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

    /// The second handle on the socket, with its own reactor registration.
    fn registered(&self) -> Option<&TcpStream> {
        self.registered
            .get_or_init(|| {
                let duplicate = self.duplicate.lock().unwrap().take()?;
                TcpStream::from_std(std::net::TcpStream::from(duplicate)).ok()
            })
            .as_ref()
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
