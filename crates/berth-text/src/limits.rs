//! Bounds on what berth reads and allocates, shared by every crate that opens a model or a
//! data file: only regular files are read (a FIFO, a device or a symlink to one would block
//! or never end), each kind of file under a size limit, and the machine's memory for sizing
//! checks before allocation.
use std::io::Read;
use std::path::Path;

/// Largest JSON metadata file read whole (config.json, tokenizer.json, index.json, ...):
/// the largest published tokenizer.json files are ~20 MB.
pub const MAX_JSON_BYTES: u64 = 256 << 20;

/// Why a file was refused.
#[derive(Debug)]
pub enum FileProblem {
    /// The OS error (missing, permission, ...).
    Io(std::io::Error),
    /// Not a regular file (what it is instead).
    NotRegular(&'static str),
    /// Larger than the limit.
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileProblem::Io(e) => write!(f, "{e}"),
            FileProblem::NotRegular(what) => write!(f, "is a {what}, not a regular file"),
            FileProblem::TooLarge { size, max } => {
                write!(f, "{size} bytes, more than the {max} bytes allowed")
            }
        }
    }
}

impl From<FileProblem> for std::io::Error {
    fn from(p: FileProblem) -> Self {
        match p {
            FileProblem::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// Checks that `path` (symlinks followed) is a regular file of at most `max` bytes and
/// returns its size.
pub fn regular_file(path: &Path, max: u64) -> Result<u64, FileProblem> {
    let meta = std::fs::metadata(path).map_err(FileProblem::Io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        return Err(FileProblem::NotRegular(if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "device"
        } else if ft.is_socket() {
            "socket"
        } else {
            "special file"
        }));
    }
    if meta.len() > max {
        return Err(FileProblem::TooLarge {
            size: meta.len(),
            max,
        });
    }
    Ok(meta.len())
}

/// Checks that `path` can be read to its end: a regular file or a pipe (process
/// substitution), not a directory or a device such as /dev/zero that never ends.
pub fn readable_stream(path: &Path) -> Result<(), FileProblem> {
    match regular_file(path, u64::MAX) {
        Err(FileProblem::NotRegular("FIFO")) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Reads a regular file of at most `max` bytes as UTF-8 text (the limit also holds if the
/// file grows while it is read).
pub fn read_text(path: &Path, max: u64) -> Result<String, FileProblem> {
    regular_file(path, max)?;
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(FileProblem::Io)?
        .take(max.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(FileProblem::Io)?;
    if text.len() as u64 > max {
        return Err(FileProblem::TooLarge {
            size: text.len() as u64,
            max,
        });
    }
    Ok(text)
}

/// This machine's memory in bytes (Linux: MemTotal, or a smaller cgroup limit); `None`
/// where it cannot be read.
pub fn memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |c| c.min(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_under_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_text(&f, 10).unwrap(), "{}");
        assert!(matches!(
            read_text(&f, 1),
            Err(FileProblem::TooLarge { size: 2, max: 1 })
        ));
        let e = read_text(dir.path(), 10).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let e = read_text(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("device"), "{e}");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read_text(&link, 10),
            Err(FileProblem::NotRegular("device"))
        ));
        assert!(memory_bytes().unwrap() > 1 << 20);
    }
}

/// The 1-based line where a quoted CSV field opens and never closes, if one does (RFC 4180:
/// a quote opens a field only at its start; inside, a doubled quote is a literal quote).
/// The `csv` crate reads such a field to the end of the file as one field, silently merging
/// every row after it, so readers check this first.
pub fn unterminated_csv_quote(bytes: &[u8]) -> Option<usize> {
    let (mut line, mut opened_at, mut quoted, mut field_start) = (1, 0, false, true);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if quoted {
            if b == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if b == b'"' && field_start {
            quoted = true;
            opened_at = line;
        }
        if b == b'\n' {
            line += 1;
        }
        field_start = !quoted && (b == b',' || b == b'\n' || b == b'\r');
        i += 1;
    }
    quoted.then_some(opened_at)
}
