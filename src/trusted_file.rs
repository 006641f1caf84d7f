//! Reading the files the proxy trusts: the config file, the TLS certificates
//! and keys, and the admin token.
//!
//! Every such read goes through [`read`], which refuses a file that anyone on
//! the host may write (sshd's `StrictModes` does the same for the files it
//! trusts) unless [`FilePolicy::allow_world_writable`] says otherwise, and a
//! file larger than [`MAX_FILE_BYTES`], checked on the metadata before a byte
//! is read, so a huge file costs neither memory nor, when polled for changes,
//! a read every second. Start-up and reload use it alike.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Largest file the proxy reads (1 MiB): a config, a certificate chain, a key
/// or a token is a few KiB; a larger file is a mistake or an attack.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The "others may write" permission bit (`S_IWOTH`).
const WORLD_WRITABLE: u32 = 0o002;

/// Which trusted files are accepted; from the command line
/// (`--allow-world-writable`), so a config file cannot grant itself the
/// exemption. The default is strict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilePolicy {
    /// Accept files whose mode lets any user write them.
    pub allow_world_writable: bool,
}

/// Why a trusted file was not read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing {path}: it is world-writable (mode {mode:03o}), so any local user could change it; \
         remove the permission (chmod o-w) or start with --allow-world-writable"
    )]
    WorldWritable { path: PathBuf, mode: u32 },
    #[error(
        "refusing {path}: it is not a regular file (a FIFO or device would block or never end)"
    )]
    NotRegular { path: PathBuf },
    #[error("refusing {path}: it is larger than {limit} bytes ({size} bytes)")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
}

impl FileError {
    /// The process (or the system) is out of file descriptors (EMFILE,
    /// ENFILE): says nothing about the file, so a watcher skips the check
    /// rather than reporting a change (and a spurious reload once the
    /// descriptors are back).
    pub fn is_descriptor_shortage(&self) -> bool {
        matches!(self, FileError::Read { source, .. } if matches!(source.raw_os_error(), Some(23 | 24)))
    }
}

/// Reads the file at `path` (following symlinks, as a Kubernetes volume's
/// `..data` swap needs) after checking its mode and size.
pub fn read(path: &Path, policy: FilePolicy) -> Result<Vec<u8>, FileError> {
    let failed = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    // Checked before opening: opening a FIFO blocks until a writer comes.
    if !std::fs::metadata(path).map_err(failed)?.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
        });
    }
    // Non-blocking: a file whose read would wait (a FIFO swapped in, some
    // /proc files) fails at once instead of stalling the proxy.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(failed)?;
    let metadata = file.metadata().map_err(failed)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & WORLD_WRITABLE != 0 && !policy.allow_world_writable {
        return Err(FileError::WorldWritable {
            path: path.to_owned(),
            mode,
        });
    }
    too_large(path, metadata.len())?;
    // The size may grow between the check and the read (or the file is not a
    // regular one): read at most one byte past the cap.
    let mut content = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut content)
        .map_err(failed)?;
    too_large(path, content.len() as u64)?;
    Ok(content)
}

/// Like [`read`], for a UTF-8 text file.
pub fn read_to_string(path: &Path, policy: FilePolicy) -> Result<String, FileError> {
    String::from_utf8(read(path, policy)?).map_err(|error| FileError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, error),
    })
}

fn too_large(path: &Path, size: u64) -> Result<(), FileError> {
    if size > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_not_a_change_of_the_file() {
        let read_error = |errno| FileError::Read {
            path: "/etc/s3fp.toml".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(read_error(24).is_descriptor_shortage(), "EMFILE");
        assert!(read_error(23).is_descriptor_shortage(), "ENFILE");
        assert!(
            !read_error(2).is_descriptor_shortage(),
            "ENOENT is a change"
        );
        let refused = FileError::NotRegular {
            path: "/etc/s3fp.toml".into(),
        };
        assert!(!refused.is_descriptor_shortage());
    }

    fn file_with_mode(content: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), content).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    #[test]
    fn a_private_file_is_read() {
        let file = file_with_mode(b"x = 1\n", 0o644);
        assert_eq!(
            read(file.path(), FilePolicy::default()).unwrap(),
            b"x = 1\n"
        );
    }

    #[test]
    fn a_world_writable_file_is_refused_unless_allowed() {
        let file = file_with_mode(b"x = 1\n", 0o666);
        let error = read(file.path(), FilePolicy::default()).unwrap_err();
        assert!(matches!(
            error,
            FileError::WorldWritable { mode: 0o666, .. }
        ));
        assert!(
            error
                .to_string()
                .contains(&file.path().display().to_string())
        );
        let allowed = FilePolicy {
            allow_world_writable: true,
        };
        assert!(read(file.path(), allowed).is_ok());
    }

    #[test]
    fn a_file_over_the_cap_is_refused_by_its_size() {
        let file = file_with_mode(&vec![b'#'; MAX_FILE_BYTES as usize + 1], 0o600);
        let error = read(file.path(), FilePolicy::default()).unwrap_err();
        assert!(matches!(error, FileError::TooLarge { .. }), "{error}");
        assert!(error.to_string().contains("larger than 1048576 bytes"));
    }
}
