//! Hot binary upgrade on one host: the running proxy hands its listening
//! sockets to a new process over a UNIX socket (`listener.handover_socket`),
//! as HAProxy's `expose-fd listeners` / `-x` does, so no connection attempt
//! is refused while the binary is replaced.
//!
//! The exchange, one line each way plus the descriptors (SCM_RIGHTS, unix(7)):
//!
//! 1. new → old: `s3-failover-proxy take-over 1`
//! 2. old → new: `s3-failover-proxy listeners 1 <role>...`, with one listening
//!    socket per role attached, in order. Both processes now accept from the
//!    same sockets: a connection waits in the kernel's backlog until one of
//!    them takes it, never refused. Or `s3-failover-proxy refused <reason>`
//!    (another user, a pause in force), which the new process reports.
//! 3. new → old: `serving`, once the new process serves. The old one then
//!    drains (stops accepting, answers in-flight and held requests within
//!    `shutdown.grace`) and exits.
//!
//! If the new process goes away before step 3, the old one carries on as if
//! nothing happened. The old process answers take-overs until it exits, also
//! while it drains after SIGTERM (its listening sockets stay open for the
//! successor, connections waiting in their backlog). Only a process of the
//! same user, or root, is served (checked with the peer's credentials,
//! SO_PEERCRED); the socket file is created mode 0600, and only a socket is
//! ever replaced at the path.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{UnixListener, UnixStream};

/// What the new process asks.
const REQUEST: &str = "s3-failover-proxy take-over 1\n";
/// How the old process's answer starts; the roles follow.
const ANSWER: &str = "s3-failover-proxy listeners 1";
/// How the old process's refusal starts; the reason follows.
const REFUSAL: &str = "s3-failover-proxy refused ";
/// What the new process says once it serves.
const SERVING: &str = "serving\n";
/// Longest each step of the exchange may take, except the wait for
/// `serving` (the new process's start-up).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the old process waits for the new one to serve.
const SERVING_TIMEOUT: Duration = Duration::from_secs(60);
/// Most listening sockets handed over: S3, S3 over TLS, admin.
const MAX_LISTENERS: usize = 3;
/// How long the new process keeps asking when the old one went away in the
/// middle of an exchange (it was exiting), before binding the addresses.
const RETRY_FOR: Duration = Duration::from_secs(10);

/// Which configured listener a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerRole {
    /// `listener.address`.
    S3,
    /// `listener.tls.address`.
    S3Tls,
    /// `admin.address`.
    Admin,
}

impl ListenerRole {
    pub const ALL: [ListenerRole; 3] = [ListenerRole::S3, ListenerRole::S3Tls, ListenerRole::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            ListenerRole::S3 => "s3",
            ListenerRole::S3Tls => "s3_tls",
            ListenerRole::Admin => "admin",
        }
    }

    /// The config key that names its address.
    pub fn config_key(self) -> &'static str {
        match self {
            ListenerRole::S3 => "listener.address",
            ListenerRole::S3Tls => "listener.tls.address",
            ListenerRole::Admin => "admin.address",
        }
    }

    fn parse(text: &str) -> Option<ListenerRole> {
        ListenerRole::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
    }
}

/// Why a handover could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("listener.handover_socket {}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        source: io::Error,
    },
    #[error("listener.handover_socket {}: {reason}", path.display())]
    Protocol { path: PathBuf, reason: String },
    #[error(
        "listener.handover_socket {}: a running proxy answers there; start with --take-over to replace it, or stop it first",
        path.display()
    )]
    InUse { path: PathBuf },
}

impl HandoverError {
    fn io(path: &Path, context: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
        let path = path.to_owned();
        move |source| HandoverError::Io {
            path,
            context,
            source,
        }
    }

    fn protocol(path: &Path, reason: impl Into<String>) -> HandoverError {
        HandoverError::Protocol {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The listening sockets the old process hands over: copies of its own
/// descriptors, so they stay open whatever its accept loops do meanwhile.
#[derive(Debug, Default)]
pub struct ListenerSockets {
    sockets: Vec<(ListenerRole, OwnedFd)>,
}

impl ListenerSockets {
    /// Adds a copy of `socket`'s descriptor under `role`.
    pub fn add(&mut self, role: ListenerRole, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.sockets.push((role, socket.try_clone_to_owned()?));
        Ok(())
    }
}

/// The old process's side: the socket new processes ask at.
#[derive(Debug)]
pub struct HandoverListener {
    socket: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this process created, so it only
    /// removes its own on exit (a successor may have put its own there).
    file: (u64, u64),
}

impl HandoverListener {
    /// Creates the socket at `path` (mode 0600). A stale socket left by a
    /// process that is gone is replaced; one that a running proxy still
    /// answers on is an error ([`HandoverError::InUse`]), and so is a file
    /// that is not a socket (never removed).
    pub async fn bind(path: &Path) -> Result<HandoverListener, HandoverError> {
        if existing_socket(path)? {
            match UnixStream::connect(path).await {
                Ok(_) => return Err(HandoverError::InUse { path: path.into() }),
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .map_err(HandoverError::io(path, "removing the stale socket"))?;
                }
                Err(_) => {}
            }
        }
        Self::bind_fresh(path)
    }

    /// Creates the socket at `path` after a handover: the predecessor's
    /// socket is still there and is replaced.
    fn bind_replacing(path: &Path) -> Result<HandoverListener, HandoverError> {
        if existing_socket(path)? {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(HandoverError::io(path, "removing the old socket")(error));
                }
            }
        }
        Self::bind_fresh(path)
    }

    fn bind_fresh(path: &Path) -> Result<HandoverListener, HandoverError> {
        let socket = UnixListener::bind(path).map_err(HandoverError::io(path, "binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(HandoverError::io(path, "setting mode 0600"))?;
        let metadata =
            std::fs::symlink_metadata(path).map_err(HandoverError::io(path, "reading"))?;
        Ok(HandoverListener {
            socket,
            path: path.to_owned(),
            file: (metadata.dev(), metadata.ino()),
        })
    }

    /// Answers take-over requests until one new process has taken `sockets`
    /// and serves; failed attempts are logged and others awaited. A request
    /// is refused with the reason `refusal` gives, if any (a pause in
    /// force). Exchanges run side by side, so a silent client cannot hold up
    /// the next; only one at a time is handed the sockets.
    pub async fn handed_over(
        &self,
        sockets: ListenerSockets,
        refusal: impl Fn() -> Option<String>,
    ) {
        let one_at_a_time = tokio::sync::Mutex::new(());
        let mut exchanges = FuturesUnordered::new();
        loop {
            tokio::select! {
                accepted = self.socket.accept() => match accepted {
                    Ok((stream, _)) => exchanges.push(self.hand_over(stream, &sockets, &refusal, &one_at_a_time)),
                    Err(error) => {
                        tracing::warn!(%error, "handover socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                Some(exchange) = exchanges.next() => match exchange {
                    Ok(()) => return,
                    Err(error) => tracing::warn!(%error, "handover abandoned; still serving"),
                },
            }
        }
    }

    async fn hand_over(
        &self,
        stream: UnixStream,
        sockets: &ListenerSockets,
        refusal: &impl Fn() -> Option<String>,
        one_at_a_time: &tokio::sync::Mutex<()>,
    ) -> Result<(), HandoverError> {
        let path = self.path.as_path();
        let mut stream = BufReader::new(stream);
        let request = read_line(&mut stream, path, STEP_TIMEOUT).await?;
        if request != REQUEST {
            return Err(HandoverError::protocol(
                path,
                format!("unexpected request {request:?}"),
            ));
        }
        let peer = stream
            .get_ref()
            .peer_cred()
            .map_err(HandoverError::io(path, "reading the peer's credentials"))?;
        let user = rustix::process::geteuid().as_raw();
        let reason = if peer.uid() != user && peer.uid() != 0 {
            Some(format!(
                "the new process runs as user {}, this one as user {user}",
                peer.uid()
            ))
        } else {
            refusal()
        };
        if let Some(reason) = reason {
            let line = format!("{REFUSAL}{reason}\n");
            let _ = tokio::time::timeout(STEP_TIMEOUT, stream.get_mut().write_all(line.as_bytes()))
                .await;
            return Err(HandoverError::protocol(path, format!("refused: {reason}")));
        }
        let _turn = one_at_a_time.lock().await;
        send_sockets(stream.get_ref(), sockets)
            .await
            .map_err(HandoverError::io(path, "sending the listening sockets"))?;
        tracing::info!(
            pid = peer.pid(),
            "listening sockets sent to a new process; waiting for it to serve"
        );
        let serving = read_line(&mut stream, path, SERVING_TIMEOUT).await?;
        if serving != SERVING {
            return Err(HandoverError::protocol(
                path,
                format!("the new process did not report serving ({serving:?})"),
            ));
        }
        Ok(())
    }
}

/// True if `path` is a socket; false if nothing is there; an error for any
/// other file, which the proxy never replaces.
fn existing_socket(path: &Path) -> Result<bool, HandoverError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => Ok(true),
        Ok(_) => Err(HandoverError::protocol(
            path,
            "exists and is not a socket; the proxy does not replace it",
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(HandoverError::io(path, "reading")(error)),
    }
}

impl Drop for HandoverListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The new process's side after a take-over: the listening sockets it got,
/// and the line to tell the old process it serves.
#[derive(Debug)]
pub struct Inherited {
    pub sockets: Vec<(ListenerRole, std::net::TcpListener)>,
    pub predecessor: Predecessor,
}

/// The old process, waiting for [`Predecessor::serving`].
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    path: PathBuf,
}

impl Predecessor {
    /// Puts this process's own handover socket in place of the old one's,
    /// then tells the old process this one serves: it drains and exits. An
    /// old process that has already gone (it was exiting) is no error.
    pub async fn serving(mut self) -> Result<HandoverListener, HandoverError> {
        let listener = HandoverListener::bind_replacing(&self.path)?;
        let told =
            tokio::time::timeout(STEP_TIMEOUT, self.stream.write_all(SERVING.as_bytes())).await;
        if !matches!(told, Ok(Ok(()))) {
            tracing::info!("the old process had already gone when told that this one serves");
        }
        Ok(listener)
    }
}

/// Asks the proxy serving at `path` for its listening sockets. `None` when
/// no proxy answers there (no socket file, or a stale one). An old process
/// that goes away in the middle of the exchange (it was exiting) is asked
/// again until it is gone, for at most 10 s (`RETRY_FOR`).
pub async fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let give_up = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match ask(path).await {
            Err(Asked::Gone(error)) if tokio::time::Instant::now() < give_up => {
                tracing::info!(%error, "the running proxy went away during the take-over; asking again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(Asked::Gone(error) | Asked::Failed(error)) => return Err(error),
            Ok(inherited) => return Ok(inherited),
        }
    }
}

/// Why one exchange failed: the old process went away (ask again), or
/// anything else.
enum Asked {
    Gone(HandoverError),
    Failed(HandoverError),
}

async fn ask(path: &Path) -> Result<Option<Inherited>, Asked> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(error) => return Err(Asked::Failed(HandoverError::io(path, "connecting")(error))),
    };
    let gone =
        |context| move |error: io::Error| Asked::Gone(HandoverError::io(path, context)(error));
    tokio::time::timeout(STEP_TIMEOUT, stream.write_all(REQUEST.as_bytes()))
        .await
        .map_err(|_| {
            Asked::Failed(HandoverError::protocol(
                path,
                "the running proxy does not read",
            ))
        })?
        .map_err(gone("asking"))?;
    let (answer, sockets) = tokio::time::timeout(STEP_TIMEOUT, receive_sockets(&stream))
        .await
        .map_err(|_| {
            Asked::Failed(HandoverError::protocol(
                path,
                "no answer from the running proxy",
            ))
        })?
        .map_err(gone("receiving the listening sockets"))?;
    if answer.is_empty() {
        return Err(Asked::Gone(HandoverError::protocol(
            path,
            "the running proxy closed the connection",
        )));
    }
    if let Some(reason) = answer.strip_prefix(REFUSAL) {
        return Err(Asked::Failed(HandoverError::protocol(
            path,
            format!("the running proxy refused: {}", reason.trim_end()),
        )));
    }
    let roles = parse_answer(&answer).ok_or_else(|| {
        Asked::Failed(HandoverError::protocol(
            path,
            format!("unexpected answer {answer:?}"),
        ))
    })?;
    if roles.len() != sockets.len() {
        return Err(Asked::Failed(HandoverError::protocol(
            path,
            format!("{} roles but {} sockets", roles.len(), sockets.len()),
        )));
    }
    let sockets = roles
        .into_iter()
        .zip(sockets)
        .map(|(role, socket)| (role, std::net::TcpListener::from(socket)))
        .collect();
    Ok(Some(Inherited {
        sockets,
        predecessor: Predecessor {
            stream,
            path: path.to_owned(),
        },
    }))
}

fn parse_answer(line: &str) -> Option<Vec<ListenerRole>> {
    let roles = line.strip_suffix('\n')?.strip_prefix(ANSWER)?;
    roles.split_whitespace().map(ListenerRole::parse).collect()
}

async fn read_line(
    stream: &mut BufReader<UnixStream>,
    path: &Path,
    limit: Duration,
) -> Result<String, HandoverError> {
    let mut line = String::new();
    // A line longer than this is no line of the exchange.
    let mut bounded = (&mut *stream).take(256);
    match tokio::time::timeout(limit, bounded.read_line(&mut line)).await {
        Err(_) => Err(HandoverError::protocol(
            path,
            format!("nothing within {limit:?}"),
        )),
        Ok(Err(error)) => Err(HandoverError::io(path, "reading")(error)),
        Ok(Ok(0)) => Err(HandoverError::protocol(path, "the other process went away")),
        Ok(Ok(_)) => Ok(line),
    }
}

async fn send_sockets(stream: &UnixStream, sockets: &ListenerSockets) -> io::Result<()> {
    let mut answer = String::from(ANSWER);
    for (role, _) in &sockets.sockets {
        answer.push(' ');
        answer.push_str(role.as_str());
    }
    answer.push('\n');
    let fds: Vec<BorrowedFd<'_>> = sockets.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("too many listening sockets"));
    }
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            sendmsg(
                stream,
                &[IoSlice::new(answer.as_bytes())],
                &mut control,
                SendFlags::empty(),
            )
            .map_err(io::Error::from)
        })
        .await?;
    if sent != answer.len() {
        return Err(io::Error::other("the answer was cut short"));
    }
    Ok(())
}

async fn receive_sockets(stream: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut bytes = [0u8; 256];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = stream
        .async_io(Interest::READABLE, || {
            recvmsg(
                stream,
                &mut [IoSliceMut::new(&mut bytes)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)
        })
        .await?;
    let mut sockets = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            sockets.extend(fds);
        }
    }
    let text = String::from_utf8_lossy(&bytes[..received.bytes]).into_owned();
    Ok((text, sockets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_each_role_in_order() {
        assert_eq!(
            parse_answer("s3-failover-proxy listeners 1 s3 admin s3_tls\n"),
            Some(vec![
                ListenerRole::S3,
                ListenerRole::Admin,
                ListenerRole::S3Tls
            ])
        );
        assert_eq!(parse_answer("s3-failover-proxy listeners 2 s3\n"), None);
        assert_eq!(parse_answer("s3-failover-proxy listeners 1 ftp\n"), None);
    }
}
