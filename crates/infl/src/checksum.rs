//! Checksums of the data infl stores and reads back (the gradient store, the BM25 index): xxh3
//! (64-bit) per fixed-size chunk, recorded beside the data when it is written and verified before
//! the data is used, one chunk at a time, so that a large file is checked in the same streaming
//! pass that reads it. A chunk that does not match is [`Error::Mismatch`] naming the file, the
//! chunk and its byte range.
//!
//! xxh3 detects corruption (bit flips, torn or edited files), not tampering: a checksum that
//! matches says the bytes are the ones infl wrote, given that nobody rewrote the checksums too.
//! The factors and checkpoints carry SHA-256 instead (in their `meta.json`/manifest), read whole.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The name recorded with the sums, so that a later algorithm can be told apart.
pub const ALGORITHM: &str = "xxh3-64";

/// Chunk length of the large files: 4 MiB, small enough that verifying one before it is used
/// adds no noticeable latency, large enough that a 100 GiB store records 25,600 sums (~0.5 MB of
/// JSON).
pub const CHUNK_BYTES: u64 = 4 << 20;

/// xxh3-64 of `bytes`, as 16 lowercase hex digits.
pub fn hex_of(bytes: &[u8]) -> String {
    format!("{:016x}", xxh3_64(bytes))
}

/// The per-chunk sums of one file, as recorded in JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkSums {
    pub algorithm: String,
    pub chunk_bytes: u64,
    /// The file's length: the last chunk is the remainder.
    pub bytes: u64,
    /// xxh3-64 of each chunk, hex.
    pub xxh3: Vec<String>,
}

/// [`ChunkSums`] checked against a file's length and parsed, ready to verify chunks.
#[derive(Debug, Clone)]
pub struct Sums {
    chunk: usize,
    len: usize,
    sums: Vec<u64>,
}

impl ChunkSums {
    /// The sums of `bytes` in chunks of `chunk_bytes`.
    pub fn of(bytes: &[u8], chunk_bytes: u64) -> Self {
        let mut h = ChunkHasher::new(chunk_bytes);
        h.update(bytes);
        h.finish()
    }

    /// Parses the sums, refusing them unless they cover exactly `len` bytes (`file` names the
    /// data in messages, `remedy` says how to redo it).
    pub fn parse(&self, len: u64, file: &Path, remedy: &str) -> Result<Sums> {
        let bad = |what: String| {
            Error::Mismatch(format!(
                "{}: {what}; the checksums or the file are corrupt, {remedy}",
                file.display()
            ))
        };
        if self.algorithm != ALGORITHM {
            return Err(bad(format!(
                "checksums of algorithm `{}`, this infl knows `{ALGORITHM}`",
                self.algorithm
            )));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > usize::MAX as u64 {
            return Err(bad(format!("chunk size {}", self.chunk_bytes)));
        }
        if len != self.bytes {
            return Err(bad(format!(
                "{len} bytes, its checksums cover {}",
                self.bytes
            )));
        }
        let want = len.div_ceil(self.chunk_bytes);
        if self.xxh3.len() as u64 != want {
            return Err(bad(format!(
                "{} checksums for {want} chunks",
                self.xxh3.len()
            )));
        }
        let sums = self
            .xxh3
            .iter()
            .enumerate()
            .map(|(i, s)| {
                u64::from_str_radix(s, 16)
                    .ok()
                    .filter(|_| s.len() == 16)
                    .ok_or_else(|| bad(format!("checksum {i} `{s}` is not 16 hex digits")))
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(Sums {
            chunk: self.chunk_bytes as usize,
            len: len as usize,
            sums,
        })
    }
}

impl Sums {
    /// The chunk length.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk
    }

    pub fn n_chunks(&self) -> usize {
        self.sums.len()
    }

    /// Byte range of chunk `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i.saturating_mul(self.chunk).min(self.len);
        start..start.saturating_add(self.chunk).min(self.len)
    }

    /// Checks chunk `i`, whose bytes are `bytes` (the whole chunk).
    pub fn verify(&self, i: usize, bytes: &[u8], file: &Path, remedy: &str) -> Result<()> {
        let range = self.range(i);
        let ok = bytes.len() == range.len() && self.sums.get(i) == Some(&xxh3_64(bytes));
        if ok {
            Ok(())
        } else {
            Err(Error::Mismatch(format!(
                "{}: chunk {i} of {} (bytes {}..{}) does not match its checksum: the file is corrupt (a disk or copy error, or it was edited); {remedy}",
                file.display(),
                self.sums.len(),
                range.start,
                range.end
            )))
        }
    }
}

/// The sums of a stream, computed as it is written.
pub struct ChunkHasher {
    chunk: u64,
    hasher: Xxh3,
    /// Bytes in the current chunk.
    filled: u64,
    total: u64,
    sums: Vec<String>,
}

impl ChunkHasher {
    pub fn new(chunk_bytes: u64) -> Self {
        ChunkHasher {
            chunk: chunk_bytes.max(1),
            hasher: Xxh3::new(),
            filled: 0,
            total: 0,
            sums: Vec::new(),
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        while !bytes.is_empty() {
            let room = (self.chunk - self.filled).min(bytes.len() as u64) as usize;
            let (now, rest) = bytes.split_at(room);
            self.hasher.update(now);
            self.filled += room as u64;
            bytes = rest;
            if self.filled == self.chunk {
                self.close_chunk();
            }
        }
    }

    fn close_chunk(&mut self) {
        self.sums.push(format!("{:016x}", self.hasher.digest()));
        self.hasher.reset();
        self.filled = 0;
    }

    pub fn finish(mut self) -> ChunkSums {
        if self.filled > 0 {
            self.close_chunk();
        }
        ChunkSums {
            algorithm: ALGORITHM.into(),
            chunk_bytes: self.chunk,
            bytes: self.total,
            xxh3: self.sums,
        }
    }
}

/// A writer that hashes what passes through it into per-chunk sums.
pub struct HashingWriter<W> {
    inner: W,
    hasher: ChunkHasher,
}

impl<W: std::io::Write> HashingWriter<W> {
    pub fn new(inner: W, chunk_bytes: u64) -> Self {
        HashingWriter {
            inner,
            hasher: ChunkHasher::new(chunk_bytes),
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The sums of everything written.
    pub fn sums(self) -> ChunkSums {
        self.hasher.finish()
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hands out a file's bytes only after the chunk they lie in has matched its sum:
/// each chunk is read whole, verified, then served. A mismatch is an [`std::io::Error`] wrapping
/// the [`Error::Mismatch`] (see [`mismatch_of`]).
pub struct VerifyingReader<R> {
    inner: R,
    sums: Sums,
    file: std::path::PathBuf,
    remedy: String,
    next_chunk: usize,
    buf: Vec<u8>,
    at: usize,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, sums: Sums, file: &Path, remedy: &str) -> Self {
        VerifyingReader {
            inner,
            sums,
            file: file.to_path_buf(),
            remedy: remedy.to_string(),
            next_chunk: 0,
            buf: Vec::new(),
            at: 0,
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let i = self.next_chunk;
        let want = self.sums.range(i).len();
        self.buf.clear();
        (&mut self.inner)
            .take(want as u64)
            .read_to_end(&mut self.buf)?;
        self.sums
            .verify(i, &self.buf, &self.file, &self.remedy)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.next_chunk += 1;
        self.at = 0;
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            if self.next_chunk >= self.sums.n_chunks() {
                return Ok(0);
            }
            self.fill()?;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The [`Error::Mismatch`] a [`VerifyingReader`] raised, if `e` is one.
pub fn mismatch_of(e: std::io::Error) -> std::result::Result<Error, std::io::Error> {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::Mismatch(msg)) => Ok(Error::Mismatch(msg.clone())),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn streamed_sums_equal_the_sums_of_the_whole() {
        let bytes = data(10_000);
        let whole = ChunkSums::of(&bytes, 1024);
        assert_eq!(whole.xxh3.len(), 10);
        assert_eq!(whole.bytes, 10_000);
        // Written in pieces that straddle chunk boundaries.
        let mut w = HashingWriter::new(Vec::new(), 1024);
        for piece in bytes.chunks(333) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.get_ref(), &bytes);
        assert_eq!(w.sums(), whole);
        assert_eq!(whole.xxh3[0], hex_of(&bytes[..1024]));
        assert_eq!(whole.xxh3[9], hex_of(&bytes[9216..]));
    }

    #[test]
    fn a_flipped_bit_is_named_by_chunk_and_byte_range() {
        let mut bytes = data(5000);
        let sums = ChunkSums::of(&bytes, 1000);
        let file = Path::new("x.bin");
        let parsed = sums.parse(5000, file, "redo it").unwrap();
        for i in 0..5 {
            parsed
                .verify(i, &bytes[parsed.range(i)], file, "redo it")
                .unwrap();
        }
        bytes[2500] ^= 0x04;
        let e = parsed
            .verify(2, &bytes[parsed.range(2)], file, "redo it")
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Mismatch(_)), "{msg}");
        assert!(
            msg.contains("x.bin: chunk 2 of 5 (bytes 2000..3000)") && msg.contains("redo it"),
            "{msg}"
        );
    }

    #[test]
    fn sums_that_do_not_cover_the_file_are_refused() {
        let sums = ChunkSums::of(&data(5000), 1000);
        let file = Path::new("x.bin");
        assert!(sums.parse(4999, file, "").is_err());
        let mut fewer = sums.clone();
        fewer.xxh3.pop();
        let e = fewer.parse(5000, file, "").unwrap_err().to_string();
        assert!(e.contains("4 checksums for 5 chunks"), "{e}");
        let mut garbled = sums.clone();
        garbled.xxh3[1] = "not hex".into();
        assert!(garbled.parse(5000, file, "").is_err());
        let mut zero = sums;
        zero.chunk_bytes = 0;
        assert!(zero.parse(5000, file, "").is_err());
    }

    #[test]
    fn the_verifying_reader_serves_good_chunks_and_stops_at_a_bad_one() {
        let bytes = data(3000);
        let sums = ChunkSums::of(&bytes, 1000)
            .parse(3000, Path::new("s"), "")
            .unwrap();
        let mut all = Vec::new();
        VerifyingReader::new(&bytes[..], sums.clone(), Path::new("s"), "")
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, bytes);
        let mut bad = bytes.clone();
        bad[2999] ^= 1;
        let mut r = VerifyingReader::new(&bad[..], sums, Path::new("s"), "");
        let mut got = vec![0u8; 2000];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, bytes[..2000], "chunks before the bad one are served");
        let e = r.read(&mut got).unwrap_err();
        let e = mismatch_of(e).unwrap().to_string();
        assert!(e.contains("chunk 2 of 3"), "{e}");
    }
}
