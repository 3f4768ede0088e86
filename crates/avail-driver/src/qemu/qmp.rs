//! A small QMP client (qemu's JSON machine protocol) over a unix socket: the greeting,
//! capability negotiation, and typed commands. Asynchronous events qemu sends between
//! replies are skipped. Every line read is bounded ([`MAX_LINE_BYTES`]) and every
//! exchange has a deadline.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from qemu, bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Longest wait for one exchange.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Errors of a QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed or closed.
    #[error("qmp: {0}")]
    Io(#[from] std::io::Error),
    /// qemu said something that is not QMP.
    #[error("qmp: unexpected reply: {0}")]
    Protocol(String),
    /// qemu refused the command.
    #[error("qmp: {class}: {desc}")]
    Refused {
        /// qemu's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// Its description.
        desc: String,
    },
    /// No answer in time.
    #[error("qmp: no answer within {0:?}")]
    Timeout(Duration),
}

/// The state of the VM (`query-status`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// Whether its vCPUs run.
    pub running: bool,
    /// qemu's run state (`running`, `paused`, `shutdown`, `inmigrate`, ...).
    pub status: String,
}

#[derive(Serialize)]
struct Request<'a, A: Serialize> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<A>,
}

/// One message from qemu: a reply, an error, the greeting or an event.
#[derive(Deserialize)]
struct Message<R> {
    #[serde(rename = "return")]
    ret: Option<R>,
    error: Option<ErrorBody>,
    #[serde(rename = "QMP")]
    greeting: Option<serde::de::IgnoredAny>,
    event: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// Empty arguments or an empty reply (`{}`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
pub struct Empty {}

/// A QMP connection, negotiated.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connect to the socket `name` in directory `dir` (see [`pin_socket`]), read the
    /// greeting and leave negotiation mode.
    pub async fn connect(dir: &Path, name: &str) -> Result<Qmp, QmpError> {
        let pinned = pin_socket(dir, name)?;
        let via = std::path::PathBuf::from(format!("/proc/self/fd/{}", pinned.as_raw_fd()));
        let stream = tokio::time::timeout(DEADLINE, UnixStream::connect(&via))
            .await
            .map_err(|_| QmpError::Timeout(DEADLINE))??;
        drop(pinned);
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting: Message<serde::de::IgnoredAny> = qmp.read().await?;
        if greeting.greeting.is_none() {
            return Err(QmpError::Protocol("no QMP greeting".into()));
        }
        qmp.execute::<Empty, Empty>("qmp_capabilities", None)
            .await?;
        Ok(qmp)
    }

    /// Run `command` with `arguments`; its typed reply.
    pub async fn execute<A: Serialize, R: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<A>,
    ) -> Result<R, QmpError> {
        let mut line = serde_json::to_vec(&Request {
            execute: command,
            arguments,
        })
        .map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        tokio::time::timeout(DEADLINE, self.writer.write_all(&line))
            .await
            .map_err(|_| QmpError::Timeout(DEADLINE))??;
        loop {
            let m: Message<R> = self.read().await?;
            if m.event.is_some() {
                continue;
            }
            if let Some(e) = m.error {
                return Err(QmpError::Refused {
                    class: e.class,
                    desc: e.desc,
                });
            }
            return m
                .ret
                .ok_or_else(|| QmpError::Protocol(format!("no return for {command}")));
        }
    }

    /// The VM's state.
    pub async fn status(&mut self) -> Result<StatusInfo, QmpError> {
        self.execute::<Empty, StatusInfo>("query-status", None)
            .await
    }

    /// Press the VM's ACPI power button (a clean shutdown, if the guest listens).
    pub async fn powerdown(&mut self) -> Result<(), QmpError> {
        self.execute::<Empty, Empty>("system_powerdown", None)
            .await
            .map(drop)
    }

    /// One message, within the deadline and the line bound.
    async fn read<T: DeserializeOwned>(&mut self) -> Result<T, QmpError> {
        let mut line = Vec::new();
        let read = async {
            loop {
                let buf = self.reader.fill_buf().await?;
                if buf.is_empty() {
                    return Err(QmpError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "qemu closed the socket",
                    )));
                }
                let nl = buf.iter().position(|&b| b == b'\n');
                let take = nl.map_or(buf.len(), |i| i + 1);
                line.extend_from_slice(&buf[..take]);
                self.reader.consume(take);
                if line.len() > MAX_LINE_BYTES {
                    return Err(QmpError::Protocol(format!(
                        "a line over {MAX_LINE_BYTES} bytes"
                    )));
                }
                if nl.is_some() {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(DEADLINE, read)
            .await
            .map_err(|_| QmpError::Timeout(DEADLINE))??;
        serde_json::from_slice(&line).map_err(|e| {
            QmpError::Protocol(format!(
                "{e}: {}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ))
        })
    }
}

/// The socket `name` in `dir`, pinned without following links: opened `O_PATH |
/// O_NOFOLLOW` relative to `dir`, and refused unless it is a socket owned by `dir`'s
/// owner. The VM's qemu runs as that owner and may put anything in its directory; the
/// agent connecting (as root, which passes every permission) must not be sent by a
/// link to another VM's socket or its own. Connecting through `/proc/self/fd/<fd>`
/// reaches the very inode checked.
pub fn pin_socket(dir: &Path, name: &str) -> Result<std::os::fd::OwnedFd, QmpError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &[u8]| {
        std::ffi::CString::new(p).map_err(|_| QmpError::Protocol("a NUL in the path".into()))
    };
    let d = cstr(dir.as_os_str().as_bytes())?;
    let n = cstr(name.as_bytes())?;
    // SAFETY: open/openat/fstat on NUL-terminated paths and owned descriptors; each
    // descriptor returned is owned exactly once.
    unsafe {
        let dfd = libc::open(
            d.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        );
        if dfd < 0 {
            return Err(QmpError::Io(std::io::Error::last_os_error()));
        }
        let dfd = OwnedFd::from_raw_fd(dfd);
        let fd = libc::openat(
            dfd.as_raw_fd(),
            n.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(QmpError::Io(std::io::Error::last_os_error()));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut ds: libc::stat = std::mem::zeroed();
        let mut fs: libc::stat = std::mem::zeroed();
        if libc::fstat(dfd.as_raw_fd(), &mut ds) != 0 || libc::fstat(fd.as_raw_fd(), &mut fs) != 0 {
            return Err(QmpError::Io(std::io::Error::last_os_error()));
        }
        if fs.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(QmpError::Protocol(format!("{name} is not a socket")));
        }
        if fs.st_uid != ds.st_uid {
            return Err(QmpError::Protocol(format!(
                "{name} is not owned by the owner of its directory"
            )));
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A QMP peer that greets, answers `qmp_capabilities`, sends an event before the
    /// next reply, and refuses an unknown command as qemu does.
    async fn peer(listener: UnixListener) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        while let Some(l) = lines.next_line().await.unwrap() {
            let reply: &[u8] = if l.contains("qmp_capabilities") {
                b"{\"return\": {}}\n"
            } else if l.contains("query-status") {
                b"{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\", \"singlestep\": false, \"running\": true}}\n"
            } else {
                b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\n"
            };
            w.write_all(reply).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_skips_events_and_reports_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(peer(listener));
        let mut q = Qmp::connect(dir.path(), "qmp.sock").await.unwrap();
        assert_eq!(
            q.status().await.unwrap(),
            StatusInfo {
                running: true,
                status: "running".into()
            }
        );
        match q.execute::<Empty, Empty>("nope", None).await {
            Err(QmpError::Refused { class, desc }) => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("nope"));
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_peer_that_is_not_qmp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"hello\": 1}\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert!(matches!(
            Qmp::connect(dir.path(), "qmp.sock").await,
            Err(QmpError::Protocol(_))
        ));
    }

    /// A link in the VM's directory to another socket is not followed, and a file
    /// that is not a socket is refused: the connection goes nowhere.
    #[tokio::test]
    async fn links_and_other_files_are_refused() {
        let elsewhere = tempfile::tempdir().unwrap();
        let other = elsewhere.path().join("other.sock");
        let _listener = UnixListener::bind(&other).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&other, dir.path().join("qmp.sock")).unwrap();
        assert!(matches!(
            Qmp::connect(dir.path(), "qmp.sock").await,
            Err(QmpError::Protocol(m)) if m.contains("not a socket")
        ));
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        assert!(pin_socket(dir.path(), "plain").is_err());
        assert!(pin_socket(dir.path(), "missing").is_err());
        // Relative names that climb out are not followed either (a link at each step
        // is refused; `..` is a directory, not a socket).
        assert!(pin_socket(dir.path(), "..").is_err());
    }
}
