//! Bearer tokens of the scheduler API: what hosts and preheat callers present, and what the
//! scheduler checks them against. Each is read from a file holding one token, and never printed.

use std::path::{Path, PathBuf};

/// Fewest characters a token may have: a shorter one is guessable, or a placeholder left in place.
pub const MIN_TOKEN_LEN: usize = 16;

/// A bearer token. Its `Debug` form hides the secret, so it can sit in logged structs.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<hidden>)")
    }
}

/// What is wrong with a token's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("it holds no token")]
    Empty,
    #[error("its token has {0} characters, fewer than the {MIN_TOKEN_LEN} needed")]
    TooShort(usize),
    #[error("its token holds a character other than visible ASCII (spaces and line breaks inside count)")]
    NotVisibleAscii,
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {source} (write one token into it, e.g. from `head -c 32 /dev/urandom | base64`)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("token file {path}: {problem} (write one token into it, e.g. from `head -c 32 /dev/urandom | base64`)")]
    Invalid { path: PathBuf, problem: TokenProblem },
}

impl BearerToken {
    /// The token in `text`; whitespace around it (a trailing newline) is ignored. Only visible
    /// ASCII is accepted, because the token travels in an HTTP header.
    pub fn parse(text: &str) -> Result<BearerToken, TokenProblem> {
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenProblem::Empty);
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenProblem::NotVisibleAscii);
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenProblem::TooShort(token.len()));
        }
        Ok(BearerToken(token.to_string()))
    }

    /// The token in the file at `path`.
    pub fn read(path: &Path) -> Result<BearerToken, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: path.into(), source })?;
        BearerToken::parse(&text).map_err(|problem| TokenError::Invalid { path: path.into(), problem })
    }

    /// The token in the file at `path`, if a path is given.
    pub fn read_optional(path: Option<&Path>) -> Result<Option<BearerToken>, TokenError> {
        path.map(BearerToken::read).transpose()
    }

    /// The secret itself, for the `authorization` header and for comparing.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_may_end_in_a_newline_but_holds_one_visible_token() {
        assert_eq!(BearerToken::parse("  abcdefghijklmnop0123\n").unwrap().secret(), "abcdefghijklmnop0123");
        assert_eq!(BearerToken::parse(" \n"), Err(TokenProblem::Empty));
        assert_eq!(BearerToken::parse("replace-me\n"), Err(TokenProblem::TooShort(10)));
        assert_eq!(BearerToken::parse("abcdefgh ijklmnopq"), Err(TokenProblem::NotVisibleAscii));
        assert_eq!(BearerToken::parse("abcdefgh\nijklmnopq"), Err(TokenProblem::NotVisibleAscii));
        assert_eq!(BearerToken::parse("abcdefghijklmnopé"), Err(TokenProblem::NotVisibleAscii));
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let t = BearerToken::parse("s3cr3t-s3cr3t-s3cr3t").unwrap();
        assert!(!format!("{t:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_missing_file_says_which_and_how_to_make_one() {
        let e = BearerToken::read(Path::new("/nonexistent/shoal/token")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/shoal/token") && e.contains("/dev/urandom"), "{e}");
    }
}
