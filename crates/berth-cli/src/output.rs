//! Where `berth embed` writes: stdout, or a file written through a temporary name beside it
//! and renamed when complete (a killed or failed run leaves the old file as it was, never a
//! half-written one). A `.npy` file holds the vectors as one `n × d` array, as
//! `numpy.load` reads it; a `.parquet` file a table of index, ids / kept columns and a
//! fixed-size-list `embedding` column; anything else is JSON Lines.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use berth_tasks::quantize::{Quantized, VectorDtype};

/// What the output holds.
enum Sink {
    /// JSON Lines (file or stdout).
    Lines(Box<dyn Write>),
    /// Row-major vectors of `dim` elements (little-endian bytes of `dtype`), written as .npy
    /// or Parquet at the end.
    Array {
        data: Vec<u8>,
        dim: Option<usize>,
        dtype: VectorDtype,
        format: ArrayFile,
    },
}

/// The file an array output is written as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ArrayFile {
    Npy,
    Parquet,
}

/// One vector's values, borrowed.
enum Values<'a> {
    Floats(&'a [f32]),
    Ints(&'a [i32]),
}

/// The output of one `berth embed` run.
/// Standard output, buffered, whose write errors say they are stdout's (the io::Error kind
/// is kept, so a closed reader is still recognised as a broken pipe).
pub fn stdout() -> std::io::BufWriter<NamedStdout> {
    std::io::BufWriter::new(NamedStdout(std::io::stdout().lock()))
}

/// [`std::io::StdoutLock`] with "writing to stdout" in its errors.
pub struct NamedStdout(std::io::StdoutLock<'static>);

impl NamedStdout {
    fn named(e: std::io::Error) -> std::io::Error {
        std::io::Error::new(e.kind(), format!("writing to stdout: {e}"))
    }
}

impl Write for NamedStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(Self::named)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(Self::named)
    }
}

pub struct Output {
    sink: Sink,
    /// Final path and its temporary sibling, for file outputs.
    file: Option<(PathBuf, PathBuf)>,
    /// What errors call it: the final file name, or stdout.
    name: String,
    /// Per input: fields (id, kept columns) added to its JSON line.
    meta: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl Output {
    /// Opens `path` (stdout when `None`); `per_token` output (`--pooling none`) cannot go to
    /// a `.npy` file.
    pub fn open(path: Option<&str>, per_token: bool) -> anyhow::Result<Self> {
        let Some(p) = path else {
            return Ok(Output {
                sink: Sink::Lines(Box::new(std::io::BufWriter::new(std::io::stdout().lock()))),
                file: None,
                name: "stdout".into(),
                meta: Vec::new(),
            });
        };
        let dst = PathBuf::from(p);
        let name = dst
            .file_name()
            .with_context(|| format!("{p}: not a file name"))?
            .to_string_lossy()
            .into_owned();
        // The process id keeps two runs writing the same file apart (the last rename wins whole).
        let tmp = dst.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        let ext = dst
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let array = match ext.as_deref() {
            Some("npy") => Some(ArrayFile::Npy),
            Some("parquet") if cfg!(feature = "parquet") => Some(ArrayFile::Parquet),
            Some("parquet") => anyhow::bail!(
                "{p}: this berth was built without Parquet support (cargo feature `parquet`)"
            ),
            _ => None,
        };
        if array.is_some() && per_token {
            anyhow::bail!(
                "{p}: an array file holds one vector per text: --pooling none writes JSON Lines"
            );
        }
        // Created now, so a missing or read-only folder fails before any work is done (an
        // array file is rewritten whole at the end).
        let created = std::fs::File::create(&tmp).with_context(|| {
            format!(
                "{}: cannot create (in its folder: {})",
                dst.display(),
                tmp.display()
            )
        })?;
        let sink = if let Some(format) = array {
            Sink::Array {
                data: Vec::new(),
                dim: None,
                dtype: VectorDtype::F32,
                format,
            }
        } else {
            Sink::Lines(Box::new(std::io::BufWriter::new(created)))
        };
        Ok(Output {
            sink,
            name: dst.display().to_string(),
            file: Some((dst, tmp)),
            meta: Vec::new(),
        })
    }

    /// Fields each input's line carries besides its own (`--id-column`, `--keep-columns`):
    /// JSON Lines fields or Parquet columns; a `.npy` array has no place for them.
    pub fn set_meta(
        &mut self,
        meta: Vec<serde_json::Map<String, serde_json::Value>>,
    ) -> anyhow::Result<()> {
        let npy = matches!(
            self.sink,
            Sink::Array {
                format: ArrayFile::Npy,
                ..
            }
        );
        if npy && meta.iter().any(|m| !m.is_empty()) {
            anyhow::bail!(
                "{}: a .npy array holds vectors only: --id-column / --keep-columns need JSON Lines or Parquet output",
                self.name
            );
        }
        self.meta = meta;
        Ok(())
    }

    /// Adds text `index`'s vector.
    pub fn vector(&mut self, index: usize, v: &[f32]) -> anyhow::Result<()> {
        self.write(index, Values::Floats(v), VectorDtype::F32)
    }

    /// Adds text `index`'s vector in storage format `dtype` (`q` from
    /// [`berth_tasks::quantize::quantize`]): JSON numbers, or the .npy array's elements.
    pub fn stored(
        &mut self,
        index: usize,
        q: &Quantized,
        dtype: VectorDtype,
    ) -> anyhow::Result<()> {
        let values = match q {
            Quantized::Floats(f) => Values::Floats(f),
            Quantized::Ints(i) => Values::Ints(i),
        };
        self.write(index, values, dtype)
    }

    /// Adds one vector's values (f32 vectors are written without a copy).
    fn write(&mut self, index: usize, q: Values<'_>, dtype: VectorDtype) -> anyhow::Result<()> {
        let name = &self.name;
        match &mut self.sink {
            Sink::Lines(w) => {
                let embedding = match q {
                    Values::Floats(f) => serde_json::to_string(f)?,
                    Values::Ints(i) => serde_json::to_string(i)?,
                };
                let text = crate::input::with_meta(
                    format!("{{\"index\":{index},\"embedding\":{embedding}}}"),
                    self.meta.get(index),
                );
                writeln!(w, "{text}").with_context(|| format!("writing to {name}"))?;
            }
            Sink::Array {
                data,
                dim,
                dtype: kind,
                ..
            } => {
                let n = match q {
                    Values::Floats(f) => f.len(),
                    Values::Ints(i) => i.len(),
                };
                if *dim.get_or_insert(n) != n {
                    anyhow::bail!(
                        "vectors of different sizes cannot share one array; this is a bug"
                    );
                }
                *kind = dtype;
                match (q, dtype) {
                    (Values::Floats(f), VectorDtype::F16) => {
                        for &x in f {
                            data.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                        }
                    }
                    (Values::Floats(f), _) => {
                        for &x in f {
                            data.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                    // Bytes: int8 values are -128..=127, uint8 0..=255.
                    (Values::Ints(i), _) => data.extend(i.iter().map(|&x| x as u8)),
                }
            }
        }
        Ok(())
    }

    /// Adds one JSON line (per-token output).
    pub fn line(&mut self, json: &str) -> anyhow::Result<()> {
        let name = &self.name;
        match &mut self.sink {
            Sink::Lines(w) => {
                Ok(writeln!(w, "{json}").with_context(|| format!("writing to {name}"))?)
            }
            Sink::Array { .. } => unreachable!("refused at open; this is a bug"),
        }
    }

    /// Completes the output: flushes, writes the array file, renames the file into place.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let sink = std::mem::replace(&mut self.sink, Sink::Lines(Box::new(std::io::sink())));
        match sink {
            Sink::Lines(mut w) => w
                .flush()
                .with_context(|| format!("writing to {}", self.name))?,
            Sink::Array {
                data,
                dim,
                dtype,
                format,
            } => {
                let (_, tmp) = self.file.as_ref().expect("array outputs are files");
                match format {
                    ArrayFile::Npy => write_npy(tmp, &data, dim.unwrap_or(0), dtype)?,
                    #[cfg(feature = "parquet")]
                    ArrayFile::Parquet => crate::parquet_io::write_vectors(
                        tmp,
                        &data,
                        dim.unwrap_or(0),
                        dtype,
                        &self.meta,
                    )?,
                    #[cfg(not(feature = "parquet"))]
                    ArrayFile::Parquet => unreachable!("refused at open"),
                }
            }
        }
        if let Some((dst, tmp)) = self.file.take() {
            std::fs::rename(&tmp, &dst)
                .with_context(|| format!("{}: cannot write", dst.display()))?;
        }
        Ok(())
    }
}

impl Drop for Output {
    /// An unfinished file output leaves nothing behind (the old file, if any, stays).
    fn drop(&mut self) {
        if let Some((_, tmp)) = &self.file {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes `data` as a float32 `[n, dim]` array in NumPy's .npy format (version 1.0:
/// magic, header length, a Python-literal header padded to a multiple of 64 bytes).
fn write_npy(path: &Path, data: &[u8], dim: usize, dtype: VectorDtype) -> anyhow::Result<()> {
    let width = match dtype {
        VectorDtype::F32 => 4,
        VectorDtype::F16 => 2,
        _ => 1,
    };
    let rows = (data.len() / width).checked_div(dim).unwrap_or(0);
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}",
        dtype.npy_descr()
    );
    // 10 bytes of preamble + header + newline, padded with spaces to a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}
