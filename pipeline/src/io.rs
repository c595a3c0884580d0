//! Reading and writing Dolma files: JSONL, `.gz` (multi-member), `.zst`, and Parquet input.
//!
//! Compression is chosen by extension as in dolma (a trailing `.tmp` is ignored). Every read
//! error names the file and the 1-based line; outputs go to `<name>.tmp` and are renamed into
//! place only once complete, so a killed run never leaves a truncated file under a final name.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Largest line (document) read by default; larger ones are errors rather than an OOM.
pub const DEFAULT_MAX_LINE_BYTES: usize = 512 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_path(path: &Path) -> Compression {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let name = name.strip_suffix(".tmp").unwrap_or(name);
        if name.ends_with(".gz") || name.ends_with(".gzip") {
            Compression::Gzip
        } else if name.ends_with(".zst") || name.ends_with(".zstd") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

/// A bad line: which file, which line, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {problem}")]
pub struct LineError {
    pub path: String,
    pub line: u64,
    pub problem: String,
}

/// Lines of one input file, decompressed, checked for UTF-8 and size.
pub struct LineReader {
    inner: Box<dyn BufRead + Send>,
    path: String,
    line: u64,
    max_bytes: usize,
    buf: Vec<u8>,
    /// Compressed bytes consumed so far, for throughput reporting.
    pub bytes_read: u64,
}

/// Outcome of reading one line.
pub enum Line<'a> {
    /// The text and its 1-based line number.
    Text(&'a str, u64),
    /// A line that cannot be used; the reader has moved past it.
    Bad(LineError),
}

impl LineReader {
    pub fn open(path: &Path, max_bytes: usize) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let raw = BufReader::with_capacity(1 << 20, file);
        let inner: Box<dyn BufRead + Send> = match Compression::from_path(path) {
            Compression::None => Box::new(raw),
            Compression::Gzip => Box::new(BufReader::with_capacity(
                1 << 20,
                flate2::bufread::MultiGzDecoder::new(raw),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                1 << 20,
                zstd::stream::read::Decoder::with_buffer(raw)
                    .with_context(|| format!("{}: cannot start zstd decoder", path.display()))?,
            )),
        };
        Ok(Self::from_reader(
            inner,
            &path.display().to_string(),
            max_bytes,
        ))
    }

    pub fn from_reader(inner: Box<dyn BufRead + Send>, path: &str, max_bytes: usize) -> Self {
        LineReader {
            inner,
            path: path.to_string(),
            line: 0,
            max_bytes,
            buf: Vec::with_capacity(1 << 16),
            bytes_read: 0,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// 1-based number of the line last returned.
    pub fn line_number(&self) -> u64 {
        self.line
    }

    /// The next line without its newline; `Ok(None)` at the end. I/O and decompression
    /// errors (e.g. a truncated gzip) are fatal for the file and name the line reached.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>> {
        self.buf.clear();
        let mut too_long = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "{}: read failed after line {} (truncated or corrupt file?)",
                        self.path, self.line
                    )))
                }
            };
            if available.is_empty() {
                break;
            }
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let n = chunk.len();
            if !too_long {
                if self.buf.len() + n > self.max_bytes + 1 {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            self.inner.consume(n);
            self.bytes_read += n as u64;
            if done {
                break;
            }
        }
        if self.buf.is_empty() && !too_long {
            return Ok(None);
        }
        self.line += 1;
        if too_long {
            return Ok(Some(Line::Bad(LineError {
                path: self.path.clone(),
                line: self.line,
                problem: format!(
                    "line longer than the {} byte limit (--max-line-bytes)",
                    self.max_bytes
                ),
            })));
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        match std::str::from_utf8(&self.buf) {
            Ok(s) => Ok(Some(Line::Text(s, self.line))),
            Err(e) => Ok(Some(Line::Bad(LineError {
                path: self.path.clone(),
                line: self.line,
                problem: format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            }))),
        }
    }
}

/// Writes `<path>.tmp`, then renames to `path` on `finish`. Dropped unfinished, it removes the
/// temporary file.
pub struct AtomicWriter {
    inner: Option<Box<dyn WriteFinish>>,
    tmp: PathBuf,
    path: PathBuf,
}

trait WriteFinish: Write + Send {
    fn finish_box(self: Box<Self>) -> io::Result<()>;
}

impl WriteFinish for BufWriter<File> {
    fn finish_box(self: Box<Self>) -> io::Result<()> {
        let f = (*self).into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    }
}

impl WriteFinish for flate2::write::GzEncoder<BufWriter<File>> {
    fn finish_box(self: Box<Self>) -> io::Result<()> {
        let w = (*self).finish()?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    }
}

impl WriteFinish for zstd::stream::write::Encoder<'static, BufWriter<File>> {
    fn finish_box(self: Box<Self>) -> io::Result<()> {
        let w = (*self).finish()?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    }
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

impl AtomicWriter {
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        let tmp = tmp_path(path);
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let buf = BufWriter::with_capacity(1 << 20, file);
        let inner: Box<dyn WriteFinish> = match Compression::from_path(path) {
            Compression::None => Box::new(buf),
            // Level 1: attribute files are highly redundant and compress well anyway, and
            // compression was a tenth of dedupe's time at level 6. Bytes differ from dolma's.
            Compression::Gzip => Box::new(flate2::write::GzEncoder::new(
                buf,
                flate2::Compression::new(1),
            )),
            Compression::Zstd => Box::new(
                zstd::stream::write::Encoder::new(buf, 3)
                    .with_context(|| format!("cannot start zstd encoder for {}", tmp.display()))?,
            ),
        };
        Ok(AtomicWriter {
            inner: Some(inner),
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn finish(mut self) -> Result<()> {
        let inner = self.inner.take().expect("finish called once");
        inner
            .finish_box()
            .with_context(|| format!("cannot finish writing {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.path.display()
            )
        })?;
        Ok(())
    }
}

impl Write for AtomicWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.as_mut().expect("not finished").write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.as_mut().expect("not finished").write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.as_mut().expect("not finished").flush()
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.inner.is_some() {
            self.inner = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Opens any supported document file as JSON lines. Parquet rows become JSON objects with the
/// file's columns (needs the `parquet` feature).
pub fn open_documents(path: &Path, max_bytes: usize) -> Result<LineReader> {
    if is_parquet(path) {
        return parquet_as_lines(path, max_bytes);
    }
    LineReader::open(path, max_bytes)
}

#[cfg(not(feature = "parquet"))]
fn parquet_as_lines(path: &Path, _max_bytes: usize) -> Result<LineReader> {
    anyhow::bail!(
        "{}: Parquet input needs a build with `--features parquet` (cargo build --release --features parquet)",
        path.display()
    )
}

#[cfg(feature = "parquet")]
fn parquet_as_lines(path: &Path, max_bytes: usize) -> Result<LineReader> {
    let jsonl = crate::parquet_input::to_jsonl(path)?;
    Ok(LineReader::from_reader(
        Box::new(io::Cursor::new(jsonl)),
        &path.display().to_string(),
        max_bytes,
    ))
}

/// Reads a whole small file (configs, lists), decompressing by extension.
pub fn read_to_string(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut s = String::new();
    let mut r: Box<dyn Read> = match Compression::from_path(path) {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
    };
    r.read_to_string(&mut s)
        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(path: &Path) -> Vec<std::result::Result<String, String>> {
        let mut r = LineReader::open(path, 64).unwrap();
        let mut out = Vec::new();
        loop {
            match r.next_line() {
                Ok(None) => break,
                Ok(Some(Line::Text(t, _))) => out.push(Ok(t.to_string())),
                Ok(Some(Line::Bad(e))) => out.push(Err(e.to_string())),
                Err(e) => {
                    out.push(Err(format!("{e:#}")));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn round_trips_every_compression() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"] {
            let p = dir.path().join(name);
            let mut w = AtomicWriter::create(&p).unwrap();
            w.write_all(b"{\"x\":1}\n\xc3\xa9\n").unwrap();
            assert!(!p.exists(), "final name appears only on finish");
            w.finish().unwrap();
            assert!(!tmp_path(&p).exists());
            assert_eq!(
                lines_of(&p),
                vec![Ok("{\"x\":1}".to_string()), Ok("é".to_string())]
            );
        }
    }

    #[test]
    fn multi_member_gzip_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json.gz");
        let mut bytes = Vec::new();
        for part in ["a\n", "b\n"] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part.as_bytes()).unwrap();
            bytes.extend(e.finish().unwrap());
        }
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(lines_of(&p), vec![Ok("a".into()), Ok("b".into())]);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.jsonl");
        let long = "x".repeat(100);
        let mut bytes = b"ok\n\xfe\xff\n".to_vec();
        bytes.extend_from_slice(format!("{long}\nlast").as_bytes());
        std::fs::write(&p, bytes).unwrap();
        let got = lines_of(&p);
        assert_eq!(got[0], Ok("ok".into()));
        let e = got[1].clone().unwrap_err();
        assert!(
            e.contains("bad.jsonl:2") && e.contains("invalid UTF-8"),
            "{e}"
        );
        let e = got[2].clone().unwrap_err();
        assert!(e.contains("bad.jsonl:3") && e.contains("byte limit"), "{e}");
        assert_eq!(got[3], Ok("last".into()));
    }

    #[test]
    fn truncated_gzip_is_an_error_with_the_line_reached() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..2000 {
            writeln!(e, "line number {i} with some padding text").unwrap();
        }
        let bytes = e.finish().unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let got = lines_of(&p);
        let e = got.last().unwrap().clone().unwrap_err();
        assert!(
            e.contains("t.jsonl.gz") && e.contains("read failed after line"),
            "{e}"
        );
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl.gz");
        {
            let mut w = AtomicWriter::create(&p).unwrap();
            w.write_all(b"partial").unwrap();
        }
        assert!(!p.exists() && !tmp_path(&p).exists());
    }
}
