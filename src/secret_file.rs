//! Files that hold secrets (the API keys file, the legacy token): opened once and checked
//! through that open handle (`fstat`, never the path again), so the file that is read is the
//! file that was checked, and refused when group or others may read or write it.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a secret file was refused. Never contains the file's text.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Opening or reading failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory, a device, a FIFO...
    #[error("{}: not a regular file", path.display())]
    NotRegular { path: PathBuf },
    /// Larger than any secret file of its kind can be.
    #[error("{}: {len} bytes, more than the {max} allowed", path.display())]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    /// Group or others may read or write it.
    #[error(
        "{} has mode {mode:04o}: group or others may read or write it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
}

/// Reads a secret file of at most `max_len` bytes, refusing one that is not a regular file or
/// that group or others may read or write.
pub fn read(path: &Path, max_len: u64) -> Result<String, SecretFileError> {
    let bytes = read_checked(path, max_len, true)?;
    String::from_utf8(bytes).map_err(|e| SecretFileError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// Reads a file that need not be secret (a certificate) the same careful way: a regular file
/// (a FIFO is refused without waiting for a writer), at most `max_len` bytes.
pub fn read_regular(path: &Path, max_len: u64) -> Result<Vec<u8>, SecretFileError> {
    read_checked(path, max_len, false)
}

fn read_checked(path: &Path, max_len: u64, secret: bool) -> Result<Vec<u8>, SecretFileError> {
    let io_err = |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking: opening a FIFO for reading would otherwise wait for a writer, before the
    // check below could refuse it. A regular file reads the same either way.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(io_err)?;
    check(&file, path, max_len, secret)?;
    let mut bytes = Vec::new();
    // Bounded even if the file grows after the check.
    file.take(max_len + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > max_len {
        return Err(SecretFileError::TooLarge {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            max: max_len,
        });
    }
    Ok(bytes)
}

/// Checks an opened file by its own metadata: a regular file, at most `max_len` bytes and, when
/// `secret`, no permission bit for group or others. `path` only names it in errors.
fn check(file: &File, path: &Path, max_len: u64, secret: bool) -> Result<(), SecretFileError> {
    let meta = file.metadata().map_err(|source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(SecretFileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if secret && mode & 0o077 != 0 {
        return Err(SecretFileError::OpenToOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > max_len {
        return Err(SecretFileError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
            max: max_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would block forever in open(2) without O_NONBLOCK; the test would hang, not fail.
        let e = read(&path, 1024).unwrap_err();
        assert!(matches!(e, SecretFileError::NotRegular { .. }), "{e}");
    }

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn private_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o700] {
            let p = write(dir.path(), "s", "secret\n", mode);
            assert_eq!(read(&p, 64).unwrap(), "secret\n");
        }
    }

    #[test]
    fn files_open_to_others_are_refused_naming_path_mode_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o660, 0o602, 0o620, 0o644, 0o610, 0o601] {
            let p = write(dir.path(), "s", "secret\n", mode);
            let e = read(&p, 64).unwrap_err();
            assert!(matches!(e, SecretFileError::OpenToOthers { .. }), "{e}");
            let shown = p.display();
            assert_eq!(
                e.to_string(),
                format!(
                    "{shown} has mode {mode:04o}: group or others may read or write it; run `chmod 600 {shown}`"
                )
            );
            assert!(!e.to_string().contains("secret\n"));
        }
    }

    #[test]
    fn the_open_file_is_checked_not_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let private = write(dir.path(), "s", "mine", 0o600);
        let file = File::open(&private).unwrap();
        // The path now names another, world-readable file; the handle still is the checked one.
        let other = write(dir.path(), "other", "theirs", 0o644);
        fs::rename(&other, &private).unwrap();
        assert!(check(&file, &private, 64, true).is_ok());
        assert!(matches!(
            check(&File::open(&private).unwrap(), &private, 64, true),
            Err(SecretFileError::OpenToOthers { mode: 0o644, .. })
        ));
    }

    #[test]
    fn other_refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read(&dir.path().join("absent"), 64),
            Err(SecretFileError::Io { .. })
        ));
        assert!(matches!(
            read(dir.path(), 64),
            Err(SecretFileError::NotRegular { .. })
        ));
        let big = write(dir.path(), "big", &"x".repeat(65), 0o600);
        let e = read(&big, 64).unwrap_err();
        assert!(
            matches!(
                e,
                SecretFileError::TooLarge {
                    len: 65,
                    max: 64,
                    ..
                }
            ),
            "{e}"
        );
    }
}
