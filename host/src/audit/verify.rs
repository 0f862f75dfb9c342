//! `capvirt audit verify`: walks the chain from the first line and names the first record
//! that breaks it.
//!
//! In an intact log line *n* holds seq *n* and the hash of line *n − 1*. Deleting or moving a
//! record shows as a wrong seq, editing one as a hash its successor does not hold, a cut tail
//! as a last line without newline. Removing whole records from the *end* leaves a valid shorter
//! chain: that needs an anchor kept elsewhere (e.g. the last seq shipped to a remote log).

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read},
    path::{Path, PathBuf},
};

use super::{log::hash_line, GENESIS, MAX_LINE};

/// An intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
}

/// The first record that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {why}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct BadRecord {
    /// 1-based line number.
    pub line: u64,
    /// The seq that line claims, when it has one.
    pub seq: Option<u64>,
    pub why: String,
}

/// Why a log did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read audit log {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("audit log {path} is broken at {bad}")]
    Broken { path: PathBuf, bad: BadRecord },
}

/// Verifies the log file at `path`.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Read { path: path.to_path_buf(), source })?;
    verify(BufReader::new(file)).map_err(|e| match e {
        Failure::Io(source) => VerifyError::Read { path: path.to_path_buf(), source },
        Failure::Bad(bad) => VerifyError::Broken { path: path.to_path_buf(), bad },
    })
}

/// Why [`verify`] stopped.
#[derive(Debug)]
pub enum Failure {
    Io(io::Error),
    Bad(BadRecord),
}

/// Verifies a log read from `reader`.
pub fn verify(mut reader: impl BufRead) -> Result<VerifyReport, Failure> {
    let mut prev_hash = GENESIS.to_string();
    let mut prev_seq: Option<u64> = None;
    let mut line = Vec::with_capacity(1024);
    let mut number = 0u64;
    loop {
        line.clear();
        let read = reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).map_err(Failure::Io)?;
        if read == 0 {
            return Ok(VerifyReport { records: number });
        }
        number += 1;
        let bad = |seq: Option<u64>, why: String| Failure::Bad(BadRecord { line: number, seq, why });
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_LINE {
                return Err(bad(None, format!("longer than {MAX_LINE} bytes: not a record")));
            }
            return Err(bad(None, "cut tail: the last line has no newline (a truncated or interrupted write)".into()));
        }
        let body = &line[..line.len() - 1];
        #[derive(serde::Deserialize)]
        struct Chained {
            seq: u64,
            prev: String,
        }
        let record: Chained = match serde_json::from_slice(body) {
            Ok(record) => record,
            Err(e) => return Err(bad(None, format!("not a chained audit record ({e})"))),
        };
        let expected = number;
        if record.seq != expected {
            let why = if record.seq > expected {
                format!("seq {} where {expected} was expected: records before it were deleted or moved", record.seq)
            } else {
                format!("seq {} where {expected} was expected: a record was inserted or moved here", record.seq)
            };
            return Err(bad(Some(record.seq), why));
        }
        if record.prev != prev_hash {
            // The sequence is intact, so the likeliest change is an edit of the previous line,
            // whose hash this record no longer matches.
            return Err(match prev_seq {
                None => bad(Some(record.seq), "the first record does not start from the genesis hash".into()),
                Some(seq) => Failure::Bad(BadRecord {
                    line: number - 1,
                    seq: Some(seq),
                    why: format!(
                        "altered: its SHA-256 is not the `prev` that line {number} (seq {}) holds",
                        record.seq
                    ),
                }),
            });
        }
        prev_hash = hash_line(body);
        prev_seq = Some(record.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let line = format!(r#"{{"seq":{seq},"prev":"{prev}","event":"refused"}}"#);
                prev = hash_line(line.as_bytes());
                line
            })
            .collect()
    }

    fn check(lines: &[String], tail: &str) -> Result<u64, BadRecord> {
        let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>() + tail;
        match verify(text.as_bytes()) {
            Ok(report) => Ok(report.records),
            Err(Failure::Bad(bad)) => Err(bad),
            Err(Failure::Io(e)) => panic!("{e}"),
        }
    }

    #[test]
    fn intact_and_empty_logs_verify() {
        assert_eq!(check(&chain(5), ""), Ok(5));
        assert_eq!(check(&[], ""), Ok(0));
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_bad_line() {
        let good = chain(5);
        let mut edited = good.clone();
        edited[2] = edited[2].replace("refused", "intent");
        assert_eq!(check(&edited, "").map_err(|b| (b.line, b.seq)), Err((3, Some(3))));

        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(check(&deleted, "").map_err(|b| (b.line, b.seq)), Err((2, Some(3))));

        let mut swapped = good.clone();
        swapped.swap(2, 3);
        assert_eq!(check(&swapped, "").map_err(|b| (b.line, b.seq)), Err((3, Some(4))));

        let mut inserted = good.clone();
        inserted.insert(2, good[1].clone());
        assert_eq!(check(&inserted, "").map_err(|b| (b.line, b.seq)), Err((3, Some(2))));

        let first_removed = good[1..].to_vec();
        assert_eq!(check(&first_removed, "").map_err(|b| b.line), Err(1));

        let cut = check(&good[..4], &good[4][..20]).map_err(|b| (b.line, b.why));
        assert!(matches!(&cut, Err((5, why)) if why.contains("cut tail")), "{cut:?}");
        let garbage = check(&good[..2], "{\"seq\":3,\n").map_err(|b| b.line);
        assert_eq!(garbage, Err(3));
    }
}
