//! The serial-console protocol between the suite in the guest and the harness on the host.
//!
//! Guest to host, one line each, written with a single `write(2)`:
//! - `PMEMSUITE start cases=<n>`: user space runs and the suite knows its plan.
//! - `PMEMSUITE info <text>`: setup facts (namespaces, mounts), for the log.
//! - `PMEMWAIT <case> <fs>`: the case is prepared and about to make its sync call; the guest
//!   waits for `PMEMACK go` so the host can read the flush counters first.
//! - `PMEMTEST <case> <fs> dev=<n> off=<bytes> len=<bytes> crc32c=<hex> [sync_us=<n>]`: the
//!   sync call returned and the data lives at byte `off` of NVDIMM `n`'s backing file. The
//!   guest waits for `PMEMACK pass` or `PMEMACK fail <why>` before the next case.
//! - `PMEMFAIL <case> <fs> <why>` and `PMEMSKIP <case> <fs> <why>`: no acknowledgement.
//! - `PMEMSUITE done: <p> passed, <f> failed, <s> skipped`, then the guest powers off.
//! - `PMEMSUITE abort <why>`: setup failed; the guest powers off.
//!
//! `dev=<n>` counts NVDIMMs in ascending guest-physical address, which is the order of
//! pmvm's `--pmem` options.

use std::fmt;
use std::str::FromStr;

use crate::cases::{Case, Fs};

/// The words that start a guest line the host must understand.
pub const GUEST_KEYWORDS: [&str; 5] = ["PMEMSUITE", "PMEMWAIT", "PMEMTEST", "PMEMFAIL", "PMEMSKIP"];

/// Errors in a protocol line. Each names the line so a log can be matched to it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown case {name:?} in {line:?}; known cases: {known}")]
    UnknownCase {
        name: String,
        line: String,
        known: String,
    },
    #[error("unknown filesystem {name:?} in {line:?}; expected raw, ext4 or xfs")]
    UnknownFs { name: String, line: String },
    #[error("{line:?} lacks the field {field}")]
    MissingField { field: &'static str, line: String },
    #[error("field {field} of {line:?} is {value:?}, not a {kind}")]
    BadValue {
        field: String,
        value: String,
        kind: &'static str,
        line: String,
    },
    #[error("unknown field {field:?} in {line:?}")]
    UnknownField { field: String, line: String },
    #[error("{line:?} is not a PMEMSUITE line this harness knows (start, info, done, abort)")]
    UnknownSuiteLine { line: String },
    #[error("{line:?} is not an acknowledgement; expected PMEMACK go, pass or fail <why>")]
    BadAck { line: String },
}

/// What the guest reports after a case's sync call returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub case: Case,
    pub fs: Fs,
    /// NVDIMM index, in --pmem order.
    pub dev: u32,
    /// Byte offset of the data in the NVDIMM (and so in its backing file).
    pub off: u64,
    pub len: u64,
    pub crc32c: u32,
    /// How long the sync call took in the guest, in microseconds.
    pub sync_us: Option<u64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PMEMTEST {} {} dev={} off={} len={} crc32c={:08x}",
            self.case, self.fs, self.dev, self.off, self.len, self.crc32c
        )?;
        if let Some(us) = self.sync_us {
            write!(f, " sync_us={us}")?;
        }
        Ok(())
    }
}

/// One line from the guest, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Start {
        cases: u32,
    },
    Info(String),
    Wait {
        case: Case,
        fs: Fs,
    },
    Test(Report),
    Fail {
        case: Case,
        fs: Fs,
        why: String,
    },
    Skip {
        case: Case,
        fs: Fs,
        why: String,
    },
    Done {
        passed: u32,
        failed: u32,
        skipped: u32,
    },
    Abort(String),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Start { cases } => write!(f, "PMEMSUITE start cases={cases}"),
            Event::Info(text) => write!(f, "PMEMSUITE info {text}"),
            Event::Wait { case, fs } => write!(f, "PMEMWAIT {case} {fs}"),
            Event::Test(r) => r.fmt(f),
            Event::Fail { case, fs, why } => write!(f, "PMEMFAIL {case} {fs} {}", one_line(why)),
            Event::Skip { case, fs, why } => write!(f, "PMEMSKIP {case} {fs} {}", one_line(why)),
            Event::Done {
                passed,
                failed,
                skipped,
            } => write!(
                f,
                "PMEMSUITE done: {passed} passed, {failed} failed, {skipped} skipped"
            ),
            Event::Abort(why) => write!(f, "PMEMSUITE abort {}", one_line(why)),
        }
    }
}

/// Newlines would split a report in two.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl Event {
    /// Finds a protocol line in a console line. The kernel may print on the console at the
    /// same moment, so the keyword need not start the line. `Ok(None)`: no keyword at all.
    pub fn find(console_line: &str) -> Result<Option<Event>, ProtocolError> {
        let start = GUEST_KEYWORDS
            .iter()
            .filter_map(|k| {
                console_line
                    .match_indices(k)
                    .find(|(i, _)| {
                        console_line[i + k.len()..].starts_with(' ')
                            || console_line.len() == i + k.len()
                    })
                    .map(|(i, _)| i)
            })
            .min();
        match start {
            None => Ok(None),
            Some(i) => console_line[i..].trim_end().parse().map(Some),
        }
    }

    /// Whether the guest waits for an acknowledgement after this line.
    pub fn wants_ack(&self) -> bool {
        matches!(self, Event::Wait { .. } | Event::Test(_))
    }
}

impl FromStr for Event {
    type Err = ProtocolError;

    fn from_str(line: &str) -> Result<Event, ProtocolError> {
        let mut words = line.split_whitespace();
        let keyword = words.next().unwrap_or_default();
        let owned = || line.to_string();
        let missing = |field| ProtocolError::MissingField {
            field,
            line: owned(),
        };
        match keyword {
            "PMEMSUITE" => {
                let what = words.next().ok_or_else(|| missing("kind"))?;
                let rest = rest_after(line, 2);
                match what {
                    "start" => {
                        let fields = Fields::parse(line, words)?;
                        fields.only(&["cases"])?;
                        Ok(Event::Start {
                            cases: fields.number("cases")?,
                        })
                    }
                    "info" => Ok(Event::Info(rest.to_string())),
                    "abort" => Ok(Event::Abort(rest.to_string())),
                    "done:" => parse_done(line, rest),
                    _ => Err(ProtocolError::UnknownSuiteLine { line: owned() }),
                }
            }
            "PMEMWAIT" | "PMEMTEST" | "PMEMFAIL" | "PMEMSKIP" => {
                let case = parse_case(line, words.next().ok_or_else(|| missing("case"))?)?;
                let fs = parse_fs(line, words.next().ok_or_else(|| missing("filesystem"))?)?;
                match keyword {
                    "PMEMWAIT" => {
                        if let Some(extra) = words.next() {
                            return Err(ProtocolError::UnknownField {
                                field: extra.to_string(),
                                line: owned(),
                            });
                        }
                        Ok(Event::Wait { case, fs })
                    }
                    "PMEMFAIL" => Ok(Event::Fail {
                        case,
                        fs,
                        why: rest_after(line, 3).to_string(),
                    }),
                    "PMEMSKIP" => Ok(Event::Skip {
                        case,
                        fs,
                        why: rest_after(line, 3).to_string(),
                    }),
                    _ => {
                        let fields = Fields::parse(line, words)?;
                        fields.only(&["dev", "off", "len", "crc32c", "sync_us"])?;
                        Ok(Event::Test(Report {
                            case,
                            fs,
                            dev: fields.number("dev")?,
                            off: fields.number("off")?,
                            len: fields.number("len")?,
                            crc32c: fields.hex32("crc32c")?,
                            sync_us: fields.optional_number("sync_us")?,
                        }))
                    }
                }
            }
            _ => Err(ProtocolError::UnknownSuiteLine { line: owned() }),
        }
    }
}

/// The text after the first `n` words.
fn rest_after(line: &str, n: usize) -> &str {
    let mut rest = line.trim_start();
    for _ in 0..n {
        rest = rest
            .find(char::is_whitespace)
            .map_or("", |i| rest[i..].trim_start());
    }
    rest.trim_end()
}

fn parse_case(line: &str, name: &str) -> Result<Case, ProtocolError> {
    Case::from_name(name).ok_or_else(|| ProtocolError::UnknownCase {
        name: name.to_string(),
        line: line.to_string(),
        known: Case::ALL
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(" "),
    })
}

fn parse_fs(line: &str, name: &str) -> Result<Fs, ProtocolError> {
    Fs::from_name(name).ok_or_else(|| ProtocolError::UnknownFs {
        name: name.to_string(),
        line: line.to_string(),
    })
}

fn parse_done(line: &str, rest: &str) -> Result<Event, ProtocolError> {
    // "<p> passed, <f> failed, <s> skipped"
    let mut counts = [None; 3];
    for part in rest.split(',') {
        let mut it = part.split_whitespace();
        let (Some(n), Some(word), None) = (it.next(), it.next(), it.next()) else {
            return Err(ProtocolError::UnknownSuiteLine {
                line: line.to_string(),
            });
        };
        let slot = match word {
            "passed" => 0,
            "failed" => 1,
            "skipped" => 2,
            _ => {
                return Err(ProtocolError::UnknownField {
                    field: word.to_string(),
                    line: line.to_string(),
                })
            }
        };
        counts[slot] = Some(n.parse::<u32>().map_err(|_| ProtocolError::BadValue {
            field: word.to_string(),
            value: n.to_string(),
            kind: "count",
            line: line.to_string(),
        })?);
    }
    let get = |i: usize, field| {
        counts[i].ok_or(ProtocolError::MissingField {
            field,
            line: line.to_string(),
        })
    };
    Ok(Event::Done {
        passed: get(0, "passed")?,
        failed: get(1, "failed")?,
        skipped: get(2, "skipped")?,
    })
}

/// `key=value` words.
struct Fields<'a> {
    line: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Fields<'a> {
    fn parse(line: &'a str, words: impl Iterator<Item = &'a str>) -> Result<Self, ProtocolError> {
        let mut pairs = Vec::new();
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(|| ProtocolError::BadValue {
                field: w.to_string(),
                value: String::new(),
                kind: "key=value pair",
                line: line.to_string(),
            })?;
            pairs.push((k, v));
        }
        Ok(Fields { line, pairs })
    }

    fn only(&self, known: &[&str]) -> Result<(), ProtocolError> {
        match self.pairs.iter().find(|(k, _)| !known.contains(k)) {
            Some((k, _)) => Err(ProtocolError::UnknownField {
                field: k.to_string(),
                line: self.line.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn get(&self, field: &'static str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(k, _)| *k == field)
            .map(|(_, v)| *v)
    }

    fn bad(&self, field: &str, value: &str, kind: &'static str) -> ProtocolError {
        ProtocolError::BadValue {
            field: field.to_string(),
            value: value.to_string(),
            kind,
            line: self.line.to_string(),
        }
    }

    fn number<T: FromStr>(&self, field: &'static str) -> Result<T, ProtocolError> {
        self.optional_number(field)?
            .ok_or_else(|| ProtocolError::MissingField {
                field,
                line: self.line.to_string(),
            })
    }

    fn optional_number<T: FromStr>(&self, field: &'static str) -> Result<Option<T>, ProtocolError> {
        self.get(field)
            .map(|v| v.parse().map_err(|_| self.bad(field, v, "decimal number")))
            .transpose()
    }

    fn hex32(&self, field: &'static str) -> Result<u32, ProtocolError> {
        let v = self.get(field).ok_or_else(|| ProtocolError::MissingField {
            field,
            line: self.line.to_string(),
        })?;
        let digits = v.strip_prefix("0x").unwrap_or(v);
        if digits.is_empty() || digits.len() > 8 {
            return Err(self.bad(field, v, "32-bit hex number"));
        }
        u32::from_str_radix(digits, 16).map_err(|_| self.bad(field, v, "32-bit hex number"))
    }
}

/// The host's answer to a line that waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// After `PMEMWAIT`: the counters are read; make the sync call.
    Go,
    /// After `PMEMTEST`: the host found the data durable.
    Pass,
    /// After `PMEMTEST`: it did not, and why.
    Fail(String),
}

impl fmt::Display for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ack::Go => f.write_str("PMEMACK go"),
            Ack::Pass => f.write_str("PMEMACK pass"),
            Ack::Fail(why) => write!(f, "PMEMACK fail {}", one_line(why)),
        }
    }
}

impl FromStr for Ack {
    type Err = ProtocolError;

    fn from_str(line: &str) -> Result<Ack, ProtocolError> {
        let line = line.trim();
        let bad = || ProtocolError::BadAck {
            line: line.to_string(),
        };
        let rest = line.strip_prefix("PMEMACK").ok_or_else(bad)?;
        if !rest.is_empty() && !rest.starts_with(' ') {
            return Err(bad());
        }
        let rest = rest.trim_start();
        match rest
            .split_once(' ')
            .map_or((rest, ""), |(w, r)| (w, r.trim()))
        {
            ("go", "") => Ok(Ack::Go),
            ("pass", "") => Ok(Ack::Pass),
            ("fail", why) => Ok(Ack::Fail(why.to_string())),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            case: Case::Fsync,
            fs: Fs::Ext4,
            dev: 1,
            off: 0x20_3000,
            len: 8192,
            crc32c: 0x00ab_cdef,
            sync_us: Some(154),
        }
    }

    #[test]
    fn report_line_has_the_documented_shape_and_round_trips() {
        let line = report().to_string();
        assert_eq!(
            line,
            "PMEMTEST fsync ext4 dev=1 off=2109440 len=8192 crc32c=00abcdef sync_us=154"
        );
        assert_eq!(line.parse::<Event>().unwrap(), Event::Test(report()));
        let without = Report {
            sync_us: None,
            ..report()
        };
        assert_eq!(
            without.to_string().parse::<Event>().unwrap(),
            Event::Test(without)
        );
    }

    #[test]
    fn every_event_round_trips() {
        let events = [
            Event::Start { cases: 41 },
            Event::Info("dev0 region0 pmem0 fsdax data=0x200000".into()),
            Event::Wait {
                case: Case::MapSync,
                fs: Fs::Xfs,
            },
            Event::Test(report()),
            Event::Fail {
                case: Case::ODirect,
                fs: Fs::Raw,
                why: "pwrite: Invalid argument (os error 22)".into(),
            },
            Event::Skip {
                case: Case::FioDsync,
                fs: Fs::Xfs,
                why: "fio is not in the image".into(),
            },
            Event::Done {
                passed: 40,
                failed: 1,
                skipped: 0,
            },
            Event::Abort("no NVDIMM region in /sys/bus/nd/devices".into()),
        ];
        for e in events {
            let line = e.to_string();
            assert_eq!(line.parse::<Event>().unwrap(), e, "{line}");
        }
    }

    #[test]
    fn find_tolerates_kernel_noise_before_the_keyword() {
        let line = "[   12.3] EXT4-fs (pmem0): mounted PMEMWAIT fsync ext4";
        assert_eq!(
            Event::find(line).unwrap(),
            Some(Event::Wait {
                case: Case::Fsync,
                fs: Fs::Ext4
            })
        );
        assert_eq!(Event::find("Run /init as init process").unwrap(), None);
        // A keyword glued to other text is not one.
        assert_eq!(Event::find("xPMEMTESTy").unwrap(), None);
    }

    #[test]
    fn bad_lines_name_the_problem() {
        let cases: [(&str, &str); 9] = [
            (
                "PMEMTEST fsync ext4 dev=1 off=12 len=8",
                "lacks the field crc32c",
            ),
            ("PMEMTEST fsnc ext4 dev=1", "unknown case \"fsnc\""),
            ("PMEMTEST fsync btrfs dev=1", "unknown filesystem \"btrfs\""),
            (
                "PMEMTEST fsync ext4 dev=x off=1 len=1 crc32c=1",
                "field dev of",
            ),
            (
                "PMEMTEST fsync ext4 dev=1 off=1 len=1 crc32c=123456789",
                "32-bit hex",
            ),
            (
                "PMEMTEST fsync ext4 dev=1 off=1 len=1 crc32c=1 colour=red",
                "unknown field \"colour\"",
            ),
            ("PMEMTEST fsync ext4 dev1", "key=value"),
            ("PMEMSUITE hello", "not a PMEMSUITE line"),
            (
                "PMEMSUITE done: 3 passed, x failed, 0 skipped",
                "not a count",
            ),
        ];
        for (line, want) in cases {
            let err = line.parse::<Event>().unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
            assert!(err.contains(line), "the error quotes the line: {err}");
        }
    }

    #[test]
    fn only_wait_and_test_lines_want_an_acknowledgement() {
        let wait: Event = "PMEMWAIT sync xfs".parse().unwrap();
        assert!(wait.wants_ack());
        assert!(Event::Test(report()).wants_ack());
        let fail: Event = "PMEMFAIL sync xfs boom".parse().unwrap();
        assert!(!fail.wants_ack());
    }

    #[test]
    fn acks_round_trip_and_reject_noise() {
        for ack in [
            Ack::Go,
            Ack::Pass,
            Ack::Fail("crc mismatch at 0x1000".into()),
        ] {
            assert_eq!(ack.to_string().parse::<Ack>().unwrap(), ack);
        }
        assert_eq!(" PMEMACK go\r".parse::<Ack>().unwrap(), Ack::Go);
        for bad in [
            "PMEMACKgo",
            "PMEMACK",
            "PMEMACK maybe",
            "ack go",
            "PMEMACK go now",
        ] {
            assert!(bad.parse::<Ack>().is_err(), "{bad}");
        }
    }
}
