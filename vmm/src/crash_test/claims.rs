//! What the guest promised: its `DURABLE` and `PENDING` console lines, each stamped with the
//! flush epoch at which it was printed, and what a crash state must therefore hold.

use serde::{Deserialize, Serialize};

/// How a claim constrains a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Extent {
    /// The file holds exactly `len` bytes.
    Exact,
    /// The file holds at least `len` bytes; the first `len` are the claimed ones.
    Prefix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A sync returned: from this epoch on, the file must hold this (or a PENDING after it).
    Durable,
    /// An atomic replacement starts that may leave the file holding this instead.
    Pending,
    /// An in-place change starts: until the next DURABLE claim only this prefix is promised.
    Changing,
}

/// One claim line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub kind: Kind,
    pub path: String,
    pub extent: Extent,
    pub len: u64,
    pub crc32c: u32,
    /// Flushes the log held when the host read the line.
    pub epoch: u64,
    /// The workload that printed it.
    pub workload: String,
    /// The line as printed.
    pub line: String,
}

/// Parses `DURABLE <path> size=<n>|prefix=<n> crc32c=<hex>` (PENDING takes size only,
/// CHANGING prefix only) into a
/// claim of epoch 0 and no workload, for the caller to stamp. Other lines are `Ok(None)`; a
/// claim line that does not parse is an error naming what is wrong.
pub fn parse(line: &str) -> Result<Option<Claim>, String> {
    let mut words = line.split_whitespace();
    let kind = match words.next() {
        Some("DURABLE") => Kind::Durable,
        Some("PENDING") => Kind::Pending,
        Some("CHANGING") => Kind::Changing,
        _ => return Ok(None),
    };
    let bad = |why: &str| Err(format!("malformed claim {line:?}: {why}"));
    let Some(path) = words.next().filter(|p| p.starts_with('/')) else {
        return bad("no absolute path after the keyword");
    };
    if path.split('/').any(|c| c == "..") || path.contains('"') {
        return bad("the path may not hold '..' or '\"'");
    }
    let (extent, len) =
        match words.next().and_then(|w| w.split_once('=')) {
            Some(("size", n)) if kind != Kind::Changing => (Extent::Exact, n),
            Some(("prefix", n)) if kind != Kind::Pending => (Extent::Prefix, n),
            _ => return bad(
                "expected size=<bytes> (DURABLE, PENDING) or prefix=<bytes> (DURABLE, CHANGING)",
            ),
        };
    let Ok(len) = len.parse::<u64>() else {
        return bad("the length is not a number");
    };
    let crc = match last_crc(words) {
        Ok(crc) => crc,
        Err(why) => return bad(why),
    };
    Ok(Some(Claim {
        kind,
        path: path.to_string(),
        extent,
        len,
        crc32c: crc,
        epoch: 0,
        workload: String::new(),
        line: line.to_string(),
    }))
}

/// The `crc32c=<hex>` that ends a console line, and nothing after it.
pub fn last_crc<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<u32, &'static str> {
    let crc = words
        .next()
        .and_then(|w| w.strip_prefix("crc32c="))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("expected crc32c=<8 hex digits>")?;
    match words.next() {
        Some(_) => Err("unexpected words after crc32c="),
        None => Ok(crc),
    }
}

/// For one path in the crash state after epoch `epoch`: the contents it may hold.
#[derive(Debug)]
pub struct Expectation<'a> {
    pub path: &'a str,
    /// The last DURABLE (or CHANGING after it) claim made at or before the epoch: what is
    /// checked.
    pub durable: &'a Claim,
    /// PENDING claims made after it and at or before the epoch: accepted alternatives.
    pub alternatives: Vec<&'a Claim>,
}

/// What every path with a DURABLE claim at or before `epoch` must hold in a crash state after
/// that epoch. `claims` are in the order the guest printed them.
pub fn expectations(claims: &[Claim], epoch: u64) -> Vec<Expectation<'_>> {
    let mut out: Vec<Expectation<'_>> = Vec::new();
    for c in claims.iter().filter(|c| c.epoch <= epoch) {
        let at = out.iter().position(|e| e.path == c.path);
        match (c.kind, at) {
            (Kind::Durable | Kind::Changing, Some(i)) => {
                out[i].durable = c;
                out[i].alternatives.clear();
            }
            (Kind::Durable, None) => out.push(Expectation {
                path: &c.path,
                durable: c,
                alternatives: Vec::new(),
            }),
            (Kind::Pending, Some(i)) => out[i].alternatives.push(c),
            // Nothing was promised about the path yet: anything goes.
            (Kind::Pending | Kind::Changing, None) => {}
        }
    }
    out
}

/// Whether `contents` (None: the file does not exist) satisfy the claim.
pub fn satisfies(claim: &Claim, contents: Option<&[u8]>) -> bool {
    let Some(bytes) = contents else {
        return false;
    };
    let len = claim.len as usize;
    match claim.extent {
        Extent::Exact => bytes.len() == len && crc32c::crc32c(bytes) == claim.crc32c,
        Extent::Prefix => bytes.len() >= len && crc32c::crc32c(&bytes[..len]) == claim.crc32c,
    }
}

/// Why `contents` fail a claim, for the report.
pub fn describe_failure(claim: &Claim, contents: Option<&[u8]>) -> String {
    match contents {
        None => "the file does not exist".into(),
        Some(b) if claim.extent == Extent::Exact && b.len() as u64 != claim.len => {
            format!("size {} instead of {}", b.len(), claim.len)
        }
        Some(b) if (b.len() as u64) < claim.len => {
            format!(
                "size {}, shorter than the durable {} bytes",
                b.len(),
                claim.len
            )
        }
        Some(b) => {
            let n = (claim.len as usize).min(b.len());
            format!(
                "contents differ: crc32c {:08x} instead of {:08x}",
                crc32c::crc32c(&b[..n]),
                claim.crc32c
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(line: &str, epoch: u64) -> Claim {
        Claim {
            epoch,
            ..parse(line).unwrap().unwrap()
        }
    }

    #[test]
    fn parses_claims_and_rejects_malformed_ones() {
        assert_eq!(parse("pmvm-init: hello").unwrap(), None);
        let c = parse("DURABLE /a/b prefix=10 crc32c=0000abcd")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.kind, c.path.as_str(), c.extent, c.len, c.crc32c),
            (Kind::Durable, "/a/b", Extent::Prefix, 10, 0xabcd)
        );
        for bad in [
            "DURABLE",
            "DURABLE a size=1 crc32c=0",
            "DURABLE /a size=x crc32c=0",
            "DURABLE /a size=1",
            "DURABLE /a size=1 crc32c=zz",
            "DURABLE /a/../b size=1 crc32c=0",
            "PENDING /a prefix=1 crc32c=0",
            "CHANGING /a size=1 crc32c=0",
            "DURABLE /a size=1 crc32c=0 extra",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expectations_follow_the_last_durable_claim_and_later_pending_ones() {
        let claims = vec![
            claim("DURABLE /f size=1 crc32c=1", 3),
            claim("PENDING /f size=2 crc32c=2", 5),
            claim("DURABLE /f size=2 crc32c=2", 7),
            claim("PENDING /g size=9 crc32c=9", 7),
        ];
        assert!(expectations(&claims, 2).is_empty());
        let e = expectations(&claims, 4);
        assert_eq!(
            (e.len(), e[0].durable.len, e[0].alternatives.len()),
            (1, 1, 0)
        );
        let e = expectations(&claims, 6);
        assert_eq!((e[0].durable.len, e[0].alternatives[0].len), (1, 2));
        let e = expectations(&claims, 7);
        assert_eq!(
            (e.len(), e[0].durable.len, e[0].alternatives.len()),
            (1, 2, 0)
        );
    }

    #[test]
    fn exact_and_prefix_claims_check_size_and_crc() {
        let data = b"hello, world";
        let crc = crc32c::crc32c(&data[..5]);
        let prefix = claim(&format!("DURABLE /p prefix=5 crc32c={crc:08x}"), 1);
        assert!(satisfies(&prefix, Some(data)));
        assert!(satisfies(&prefix, Some(&data[..5])));
        assert!(!satisfies(&prefix, Some(&data[..4])));
        assert!(!satisfies(&prefix, None));
        let exact = claim(&format!("DURABLE /e size=5 crc32c={crc:08x}"), 1);
        assert!(satisfies(&exact, Some(&data[..5])));
        assert!(!satisfies(&exact, Some(data)));
        assert_eq!(describe_failure(&exact, Some(data)), "size 12 instead of 5");
        assert!(describe_failure(&exact, Some(b"HELLO")).starts_with("contents differ"));
        assert_eq!(describe_failure(&exact, None), "the file does not exist");
    }
}
