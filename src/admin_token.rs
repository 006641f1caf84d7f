//! The admin API's bearer token: read from a file (a mounted Kubernetes
//! Secret, typically), compared in constant time, never logged.
//!
//! [`crate::config`] reads it at start and on every reload (the reload path
//! also watches the file, so a rotated Secret takes effect within a poll);
//! [`crate::admin`] asks [`AdminToken::authorizes`] about each `/admin/*`
//! request's `Authorization` header.

use std::fmt;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

use crate::trusted_file::{self, FilePolicy};

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] trusted_file::FileError),
    #[error("{path} holds no token (the file is empty or only whitespace)")]
    Empty { path: PathBuf },
    #[error("{path} holds a token with spaces or control characters inside it")]
    NotAToken { path: PathBuf },
}

/// The secret `/admin/*` requests must present as `Authorization: Bearer <token>`.
#[derive(Clone)]
pub struct AdminToken {
    /// Where it was read from, to report which file a rotation concerns.
    file: PathBuf,
    secret: Vec<u8>,
}

impl AdminToken {
    /// Reads the token at `file`; leading and trailing whitespace (the newline
    /// `echo` and editors add) is not part of it.
    pub fn read(file: &Path, policy: FilePolicy) -> Result<AdminToken, TokenError> {
        let content = trusted_file::read(file, policy)?;
        let secret = content.trim_ascii();
        if secret.is_empty() {
            return Err(TokenError::Empty {
                path: file.to_owned(),
            });
        }
        // A header value carries visible ASCII; anything else could never match.
        if !secret.iter().all(u8::is_ascii_graphic) {
            return Err(TokenError::NotAToken {
                path: file.to_owned(),
            });
        }
        Ok(AdminToken {
            file: file.to_owned(),
            secret: secret.to_vec(),
        })
    }

    /// The file the token came from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether an `Authorization` header value is `Bearer <this token>`. The
    /// scheme is case-insensitive (RFC 9110 section 11.1); the token is
    /// compared in constant time, so the answer's timing tells nothing about
    /// how much of a guess was right (only whether its length was).
    pub fn authorizes(&self, authorization: &[u8]) -> bool {
        let Some((scheme, credentials)) = split_once_space(authorization) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer")
            && bool::from(credentials.trim_ascii().ct_eq(&self.secret))
    }
}

fn split_once_space(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = value.iter().position(|&b| b == b' ')?;
    Some((&value[..at], &value[at + 1..]))
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("file", &self.file)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl PartialEq for AdminToken {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file && bool::from(self.secret.ct_eq(&other.secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(content: &str) -> Result<AdminToken, TokenError> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), content).unwrap();
        AdminToken::read(file.path(), FilePolicy::default())
    }

    #[test]
    fn only_the_bearer_token_authorizes() {
        let token = token("s3cr3t-token\n").unwrap();
        assert!(token.authorizes(b"Bearer s3cr3t-token"));
        assert!(token.authorizes(b"bearer s3cr3t-token"));
        assert!(!token.authorizes(b"Bearer s3cr3t-tokeN"));
        assert!(!token.authorizes(b"Bearer s3cr3t"));
        assert!(!token.authorizes(b"Basic s3cr3t-token"));
        assert!(!token.authorizes(b"s3cr3t-token"));
        assert!(!token.authorizes(b""));
    }

    #[test]
    fn an_empty_or_spaced_token_is_refused() {
        assert!(matches!(token(" \n"), Err(TokenError::Empty { .. })));
        assert!(matches!(
            token("two words"),
            Err(TokenError::NotAToken { .. })
        ));
    }

    #[test]
    fn the_secret_is_not_in_debug_output() {
        let token = token("s3cr3t-token").unwrap();
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }
}
