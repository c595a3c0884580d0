//! `{save_folder}/data-indices/rank{R}.tsv.gz`, OLMo's record of what each step trained on: one
//! line `step\tidx\tidx...` per step (the step counted from 1, as OLMo's `global_step` when it
//! writes), with the instance indices of this rank's share of the batch.
//!
//! Unlike OLMo (which refuses to start when the file exists, or overwrites it), a restart keeps
//! the lines up to its checkpoint's step and appends after them. Each line is its own gzip
//! member (concatenated members are one valid gzip stream to `zcat` and Python's `gzip`), so a
//! killed run loses at most the line in flight, and a resumed run rewrites the kept lines to the
//! same bytes: the file ends identical to an uninterrupted run's. It records the truth where
//! `batch-at` cannot: after `fast_forward_batches` or a jump to a later epoch.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

pub struct DataIndices {
    file: File,
    path: PathBuf,
}

pub fn path(folder: &Path, rank: usize) -> PathBuf {
    folder
        .join("data-indices")
        .join(format!("rank{rank}.tsv.gz"))
}

fn member(line: &str) -> Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(line.as_bytes())?;
    Ok(gz.finish()?)
}

/// The whole lines of a file of gzip members, up to the first damaged one (a killed writer's).
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(MultiGzDecoder::new(file));
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.ends_with('\n') => lines.push(std::mem::take(&mut line)),
            Ok(_) => break,
        }
    }
    Ok(lines)
}

/// The instances step `step` (counted from 1) trained on, as the run's files recorded them:
/// rank `rank`'s share, or with `None` the global batch, the ranks' shares interleaved back
/// (rank r took every world-th instance from the r-th).
pub fn recorded_batch(folder: &Path, step: u64, rank: Option<usize>) -> Result<Vec<u32>> {
    let mut ranks = 0;
    while path(folder, ranks).exists() {
        ranks += 1;
    }
    if ranks == 0 {
        anyhow::bail!("{}: no rank0.tsv.gz", folder.join("data-indices").display());
    }
    let share = |r: usize| -> Result<Vec<u32>> {
        let p = path(folder, r);
        let prefix = format!("{step}\t");
        let line = read_lines(&p)?
            .into_iter()
            .find(|l| l.starts_with(&prefix))
            .with_context(|| format!("{}: no line for step {step}", p.display()))?;
        line.trim_end()
            .split('\t')
            .skip(1)
            .map(|x| {
                x.parse::<u32>()
                    .with_context(|| format!("{}: `{x}`", p.display()))
            })
            .collect()
    };
    match rank {
        Some(r) if r >= ranks => anyhow::bail!(
            "{}: rank {r} has no file ({ranks} ranks recorded)",
            folder.join("data-indices").display()
        ),
        Some(r) => share(r),
        None => {
            let shares: Vec<Vec<u32>> = (0..ranks).map(share).collect::<Result<_>>()?;
            if shares.iter().any(|s| s.len() != shares[0].len()) {
                anyhow::bail!(
                    "{}: the ranks' records of step {step} differ in size (files left from a run with another world size?): ask for one with --rank",
                    folder.join("data-indices").display()
                );
            }
            let n = shares.iter().map(Vec::len).sum();
            Ok((0..n).map(|k| shares[k % ranks][k / ranks]).collect())
        }
    }
}

impl DataIndices {
    /// Opens this rank's file for a run at `resume_step`, keeping the earlier steps' lines.
    pub fn open(folder: &Path, rank: usize, resume_step: u64) -> Result<DataIndices> {
        let path = path(folder, rank);
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let kept = if resume_step > 0 && path.exists() {
            read_lines(&path)?
        } else {
            Vec::new()
        };
        let mut bytes = Vec::new();
        for line in kept.iter().filter(|l| {
            l.split('\t')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s <= resume_step)
        }) {
            bytes.extend(member(line)?);
        }
        let tmp = path.with_extension("gz.tmp");
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(DataIndices { file, path })
    }

    pub fn write(&mut self, step: u64, indices: &[u32]) -> Result<()> {
        let mut line = step.to_string();
        for i in indices {
            line.push('\t');
            line.push_str(&i.to_string());
        }
        line.push('\n');
        self.file
            .write_all(&member(&line)?)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_keeps_the_earlier_lines_and_ends_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut whole = DataIndices::open(&a, 0, 0).unwrap();
        for s in 1..=6 {
            whole.write(s, &[s as u32, 10 + s as u32]).unwrap();
        }
        let mut part = DataIndices::open(&b, 0, 0).unwrap();
        for s in 1..=5 {
            part.write(s, &[s as u32, 10 + s as u32]).unwrap();
        }
        drop(part);
        // killed mid-write: half a member at the end
        let p = path(&b, 0);
        let mut bytes = std::fs::read(&p).unwrap();
        let half = member("6\t6\t16\n").unwrap();
        bytes.extend(&half[..half.len() / 2]);
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(read_lines(&p).unwrap().len(), 5);
        // resumed from the checkpoint at step 3
        let mut part = DataIndices::open(&b, 0, 3).unwrap();
        for s in 4..=6 {
            part.write(s, &[s as u32, 10 + s as u32]).unwrap();
        }
        assert_eq!(
            std::fs::read(path(&a, 0)).unwrap(),
            std::fs::read(&p).unwrap()
        );
        let lines = read_lines(&p).unwrap();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[3], "4\t4\t14\n");
    }

    #[test]
    fn the_global_batch_is_the_ranks_shares_interleaved() {
        let dir = tempfile::tempdir().unwrap();
        let mut r0 = DataIndices::open(dir.path(), 0, 0).unwrap();
        let mut r1 = DataIndices::open(dir.path(), 1, 0).unwrap();
        r0.write(1, &[10, 12, 14]).unwrap();
        r1.write(1, &[11, 13, 15]).unwrap();
        r0.write(2, &[20, 22]).unwrap();
        r1.write(2, &[21]).unwrap();
        assert_eq!(
            recorded_batch(dir.path(), 1, None).unwrap(),
            [10, 11, 12, 13, 14, 15]
        );
        assert_eq!(
            recorded_batch(dir.path(), 1, Some(1)).unwrap(),
            [11, 13, 15]
        );
        let err = recorded_batch(dir.path(), 2, None).unwrap_err();
        assert!(format!("{err}").contains("differ in size"), "{err}");
        let err = recorded_batch(dir.path(), 3, None).unwrap_err();
        assert!(format!("{err:#}").contains("no line for step 3"), "{err:#}");
        assert!(recorded_batch(dir.path(), 1, Some(2)).is_err());
    }
}
