//! The `--pmem` option: `path=FILE[,size=SIZE][,id=NAME][,readonly=on|off][,hints=N]`
//! `[,persist=adr|flush][,writeback-interval=MS][,flush-log=PATH][,on-error=stop|exit]`
//! `[,sparse=on|off]`, parsed into the device crate's typed [`PmemConfig`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nvdimm::config::{
    OnError, PersistMode, PmemConfig, MAX_WRITEBACK_INTERVAL_MS, MIN_WRITEBACK_INTERVAL_MS,
};
use nvdimm::size::{format_size, parse_size, SizeError};
use nvdimm::{MAX_DEVICES, MAX_HINTS, MAX_ID_LEN};

/// Why a `--pmem` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PmemOptionError {
    #[error(
        "empty --pmem value: expected path=FILE[,size=SIZE][,id=NAME][,readonly=on|off][,hints=N][,persist=adr|flush][,writeback-interval=MS][,flush-log=PATH]"
    )]
    Empty,
    #[error("--pmem segment {segment:?} is not key=value (commas inside paths are not supported)")]
    NotKeyValue { segment: String },
    #[error("--pmem has unknown key {key:?}: expected path, size, id, readonly or hints, or persist, writeback-interval, flush-log, on-error or sparse")]
    UnknownKey { key: String },
    #[error("--pmem gives {key}= twice")]
    DuplicateKey { key: String },
    #[error("--pmem has no path=FILE")]
    MissingPath,
    #[error("--pmem path= is empty")]
    EmptyPath,
    #[error("--pmem size={value:?} is not a size")]
    BadSize {
        value: String,
        #[source]
        source: SizeError,
    },
    #[error("--pmem id= is empty")]
    EmptyId,
    #[error("--pmem id={id:?} contains {bad:?}: ids may only use A-Z, a-z, 0-9, '_' and '-'")]
    BadIdChar { id: String, bad: char },
    #[error("--pmem id={id:?} is {len} characters long; at most {max} are allowed", max = MAX_ID_LEN)]
    IdTooLong { id: String, len: usize },
    #[error("--pmem readonly={value:?} must be on or off")]
    BadReadonly { value: String },
    #[error("--pmem hints={value:?} is not a number between 1 and {max}", max = MAX_HINTS)]
    BadHints { value: String },
    #[error("--pmem persist={value:?} must be adr or flush")]
    BadPersist { value: String },
    #[error("--pmem on-error={value:?} must be stop or exit")]
    BadOnError { value: String },
    #[error("--pmem sparse={value:?} must be on or off")]
    BadSparse { value: String },
    #[error("--pmem writeback-interval={value:?} is not a number of milliseconds between {min} and {max}", min = MIN_WRITEBACK_INTERVAL_MS, max = MAX_WRITEBACK_INTERVAL_MS)]
    BadWritebackInterval { value: String },
    #[error("--pmem flush-log= is empty")]
    EmptyFlushLog,
    #[error("--pmem writeback-interval= needs persist=adr: with persist=flush the file may change only at guest flushes")]
    WritebackNeedsAdr,
    #[error("--pmem {key}= does not apply to a readonly=on device, whose file never changes")]
    ReadonlyWith { key: &'static str },
}

/// Why a set of `--pmem` devices was rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PmemSetError {
    #[error("{count} --pmem devices given; at most {max} are supported")]
    TooManyDevices { count: usize, max: usize },
    #[error("--pmem devices #{first} and #{second} both have id {id:?}; ids must be unique")]
    DuplicateId {
        id: String,
        first: usize,
        second: usize,
    },
}

/// Parses one `--pmem` value.
pub fn parse(s: &str) -> Result<PmemConfig, PmemOptionError> {
    {
        if s.trim().is_empty() {
            return Err(PmemOptionError::Empty);
        }
        let mut path = None;
        let mut size = None;
        let mut id = None;
        let mut readonly = None;
        let mut hints = None;
        let mut persist = None;
        let mut writeback_interval = None;
        let mut flush_log = None;
        let mut on_error = None;
        let mut sparse = None;
        for segment in s.split(',') {
            let (key, value) =
                segment
                    .split_once('=')
                    .ok_or_else(|| PmemOptionError::NotKeyValue {
                        segment: segment.to_string(),
                    })?;
            let duplicate = || PmemOptionError::DuplicateKey {
                key: key.to_string(),
            };
            match key {
                "path" => set_once(&mut path, parse_path(value)?).ok_or_else(duplicate)?,
                "size" => set_once(&mut size, parse_config_size(value)?).ok_or_else(duplicate)?,
                "id" => set_once(&mut id, parse_id(value)?).ok_or_else(duplicate)?,
                "readonly" => {
                    set_once(&mut readonly, parse_on_off(value)?).ok_or_else(duplicate)?
                }
                "hints" => set_once(&mut hints, parse_hints(value)?).ok_or_else(duplicate)?,
                "persist" => set_once(&mut persist, parse_persist(value)?).ok_or_else(duplicate)?,
                "writeback-interval" => set_once(&mut writeback_interval, parse_interval(value)?)
                    .ok_or_else(duplicate)?,
                "flush-log" => {
                    set_once(&mut flush_log, parse_flush_log(value)?).ok_or_else(duplicate)?
                }
                "on-error" => {
                    set_once(&mut on_error, parse_on_error(value)?).ok_or_else(duplicate)?
                }
                "sparse" => {
                    let on = parse_on_off(value).map_err(|_| PmemOptionError::BadSparse {
                        value: value.to_string(),
                    })?;
                    set_once(&mut sparse, on).ok_or_else(duplicate)?
                }
                _ => {
                    return Err(PmemOptionError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            }
        }
        let config = PmemConfig {
            path: path.ok_or(PmemOptionError::MissingPath)?,
            size,
            id,
            readonly: readonly.unwrap_or(false),
            hints,
            persist: persist.unwrap_or_default(),
            writeback_interval,
            flush_log,
            on_error: on_error.unwrap_or_default(),
            sparse: sparse.unwrap_or(false),
        };
        check_combination(&config, persist.is_some())?;
        Ok(config)
    }
}

/// Options that are each valid but make no sense together.
fn check_combination(c: &PmemConfig, persist_given: bool) -> Result<(), PmemOptionError> {
    {
        if c.readonly {
            let key = if persist_given {
                Some("persist")
            } else if c.writeback_interval.is_some() {
                Some("writeback-interval")
            } else if c.flush_log.is_some() {
                Some("flush-log")
            } else {
                None
            };
            if let Some(key) = key {
                return Err(PmemOptionError::ReadonlyWith { key });
            }
        }
        if c.writeback_interval.is_some() && c.persist != PersistMode::Adr {
            return Err(PmemOptionError::WritebackNeedsAdr);
        }
        Ok(())
    }
}

/// Stores `value` unless the slot is already filled; None means the key was given twice.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

fn parse_path(value: &str) -> Result<PathBuf, PmemOptionError> {
    if value.is_empty() {
        return Err(PmemOptionError::EmptyPath);
    }
    Ok(PathBuf::from(value))
}

fn parse_config_size(value: &str) -> Result<u64, PmemOptionError> {
    parse_size(value).map_err(|source| PmemOptionError::BadSize {
        value: value.to_string(),
        source,
    })
}

fn parse_id(value: &str) -> Result<String, PmemOptionError> {
    if value.is_empty() {
        return Err(PmemOptionError::EmptyId);
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(PmemOptionError::BadIdChar {
            id: value.to_string(),
            bad,
        });
    }
    if value.len() > MAX_ID_LEN {
        return Err(PmemOptionError::IdTooLong {
            id: value.to_string(),
            len: value.len(),
        });
    }
    Ok(value.to_string())
}

fn parse_on_off(value: &str) -> Result<bool, PmemOptionError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(PmemOptionError::BadReadonly {
            value: value.to_string(),
        }),
    }
}

fn parse_persist(value: &str) -> Result<PersistMode, PmemOptionError> {
    match value {
        "adr" => Ok(PersistMode::Adr),
        "flush" => Ok(PersistMode::Flush),
        _ => Err(PmemOptionError::BadPersist {
            value: value.to_string(),
        }),
    }
}

fn parse_on_error(value: &str) -> Result<OnError, PmemOptionError> {
    match value {
        "stop" => Ok(OnError::Stop),
        "exit" => Ok(OnError::Exit),
        _ => Err(PmemOptionError::BadOnError {
            value: value.to_string(),
        }),
    }
}

fn parse_interval(value: &str) -> Result<Duration, PmemOptionError> {
    match value.parse::<u64>() {
        Ok(ms) if (MIN_WRITEBACK_INTERVAL_MS..=MAX_WRITEBACK_INTERVAL_MS).contains(&ms) => {
            Ok(Duration::from_millis(ms))
        }
        _ => Err(PmemOptionError::BadWritebackInterval {
            value: value.to_string(),
        }),
    }
}

fn parse_flush_log(value: &str) -> Result<PathBuf, PmemOptionError> {
    if value.is_empty() {
        return Err(PmemOptionError::EmptyFlushLog);
    }
    Ok(PathBuf::from(value))
}

fn parse_hints(value: &str) -> Result<u32, PmemOptionError> {
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_HINTS).contains(&n) => Ok(n),
        _ => Err(PmemOptionError::BadHints {
            value: value.to_string(),
        }),
    }
}

/// Writes the `--pmem` form back, so messages can quote a device as the user would write it.
pub struct Display<'a>(pub &'a PmemConfig);

impl fmt::Display for Display<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        write!(f, "path={}", c.path.display())?;
        if let Some(size) = c.size {
            write!(f, ",size={}", format_size(size))?;
        }
        if let Some(id) = &c.id {
            write!(f, ",id={id}")?;
        }
        if c.readonly {
            write!(f, ",readonly=on")?;
        }
        if let Some(hints) = c.hints {
            write!(f, ",hints={hints}")?;
        }
        if c.persist != PersistMode::Adr {
            write!(f, ",persist={}", c.persist)?;
        }
        if let Some(interval) = c.writeback_interval {
            write!(f, ",writeback-interval={}", interval.as_millis())?;
        }
        if let Some(log) = &c.flush_log {
            write!(f, ",flush-log={}", log.display())?;
        }
        if c.on_error != OnError::Stop {
            write!(f, ",on-error={}", c.on_error.as_str())?;
        }
        if c.sparse {
            write!(f, ",sparse=on")?;
        }
        Ok(())
    }
}

/// Checks that need the whole set of devices: how many there are, and that ids are unique.
pub fn validate_set(configs: &[PmemConfig]) -> Result<(), PmemSetError> {
    if configs.len() > MAX_DEVICES {
        return Err(PmemSetError::TooManyDevices {
            count: configs.len(),
            max: MAX_DEVICES,
        });
    }
    let ids: Vec<String> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| c.id_or_default(i))
        .collect();
    for (second, id) in ids.iter().enumerate() {
        if let Some(first) = ids[..second].iter().position(|other| other == id) {
            return Err(PmemSetError::DuplicateId {
                id: id.clone(),
                first,
                second,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PmemConfig, PmemOptionError> {
        super::parse(s)
    }

    #[test]
    fn path_only_takes_defaults() {
        let c = parse("path=/tmp/pmem.img").unwrap();
        // The device crate's defaults, whatever they are.
        assert_eq!(c, PmemConfig::new("/tmp/pmem.img"));
        assert_eq!((c.persist, c.on_error), (PersistMode::Adr, OnError::Stop));
        assert_eq!(c.id_or_default(3), "pmem3");
    }

    #[test]
    fn every_key() {
        let c = parse("hints=4,readonly=on,id=data_1-x,size=3G,path=a b.img").unwrap();
        assert_eq!(c.path, PathBuf::from("a b.img"));
        assert_eq!(c.size, Some(3 << 30));
        assert_eq!(c.id.as_deref(), Some("data_1-x"));
        assert!(c.readonly);
        assert_eq!(c.hints, Some(4));
        assert_eq!(c.id_or_default(0), "data_1-x");
        assert!(!parse("path=x,readonly=off").unwrap().readonly);
        assert_eq!(parse("path=x,hints=16").unwrap().hints, Some(16));
        assert_eq!(parse("path=x=y").unwrap().path, PathBuf::from("x=y"));
    }

    #[test]
    fn persistence_keys() {
        let c = parse("path=x").unwrap();
        assert_eq!(c.persist, PersistMode::Adr);
        assert_eq!((c.writeback_interval, c.flush_log), (None, None));
        let c = parse("path=x,persist=flush,flush-log=/tmp/a=b.log").unwrap();
        assert_eq!(c.persist, PersistMode::Flush);
        assert_eq!(c.flush_log, Some(PathBuf::from("/tmp/a=b.log")));
        let c = parse("path=x,persist=adr,writeback-interval=10").unwrap();
        assert_eq!(c.writeback_interval, Some(Duration::from_millis(10)));
        let c = parse("path=x,writeback-interval=3600000").unwrap();
        assert_eq!(c.writeback_interval, Some(Duration::from_secs(3600)));
        // Explicit persist=adr is the default and is not written back out.
        assert_eq!(
            Display(&parse("path=x,persist=adr").unwrap()).to_string(),
            "path=x"
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "path=/a/b.img",
            "path=p,size=1536K,id=x,readonly=on,hints=2",
            "path=p,persist=flush,flush-log=/l/og",
            "path=p,writeback-interval=250,flush-log=x.log",
        ] {
            let c = parse(s).unwrap();
            assert_eq!(Display(&c).to_string(), s);
            assert_eq!(parse(&Display(&c).to_string()).unwrap(), c);
        }
    }

    #[test]
    fn every_error() {
        let cases: &[(&str, PmemOptionError)] = &[
            ("", PmemOptionError::Empty),
            (
                "path=a,b.img",
                PmemOptionError::NotKeyValue {
                    segment: "b.img".into(),
                },
            ),
            (
                "path=a,,size=2M",
                PmemOptionError::NotKeyValue { segment: "".into() },
            ),
            (
                "path=a,colour=red",
                PmemOptionError::UnknownKey {
                    key: "colour".into(),
                },
            ),
            (
                "path=a,Path=b",
                PmemOptionError::UnknownKey { key: "Path".into() },
            ),
            (
                "path=a,path=b",
                PmemOptionError::DuplicateKey { key: "path".into() },
            ),
            (
                "path=a,size=2M,size=4M",
                PmemOptionError::DuplicateKey { key: "size".into() },
            ),
            (
                "path=a,id=x,id=y",
                PmemOptionError::DuplicateKey { key: "id".into() },
            ),
            (
                "path=a,readonly=on,readonly=on",
                PmemOptionError::DuplicateKey {
                    key: "readonly".into(),
                },
            ),
            (
                "path=a,hints=1,hints=2",
                PmemOptionError::DuplicateKey {
                    key: "hints".into(),
                },
            ),
            ("size=2M", PmemOptionError::MissingPath),
            ("path=", PmemOptionError::EmptyPath),
            ("path=a,id=", PmemOptionError::EmptyId),
            (
                "path=a,id=my.dev",
                PmemOptionError::BadIdChar {
                    id: "my.dev".into(),
                    bad: '.',
                },
            ),
            (
                "path=a,id=dév",
                PmemOptionError::BadIdChar {
                    id: "dév".into(),
                    bad: 'é',
                },
            ),
            (
                "path=a,readonly=yes",
                PmemOptionError::BadReadonly {
                    value: "yes".into(),
                },
            ),
            (
                "path=a,readonly=",
                PmemOptionError::BadReadonly { value: "".into() },
            ),
            (
                "path=a,hints=0",
                PmemOptionError::BadHints { value: "0".into() },
            ),
            (
                "path=a,hints=17",
                PmemOptionError::BadHints { value: "17".into() },
            ),
            (
                "path=a,hints=many",
                PmemOptionError::BadHints {
                    value: "many".into(),
                },
            ),
            (
                "path=a,hints=-1",
                PmemOptionError::BadHints { value: "-1".into() },
            ),
            (
                "path=a,persist=eadr",
                PmemOptionError::BadPersist {
                    value: "eadr".into(),
                },
            ),
            (
                "path=a,persist=adr,persist=flush",
                PmemOptionError::DuplicateKey {
                    key: "persist".into(),
                },
            ),
            (
                "path=a,writeback-interval=9",
                PmemOptionError::BadWritebackInterval { value: "9".into() },
            ),
            (
                "path=a,writeback-interval=3600001",
                PmemOptionError::BadWritebackInterval {
                    value: "3600001".into(),
                },
            ),
            (
                "path=a,writeback-interval=1s",
                PmemOptionError::BadWritebackInterval { value: "1s".into() },
            ),
            ("path=a,flush-log=", PmemOptionError::EmptyFlushLog),
            (
                "path=a,flush-log=x,flush-log=y",
                PmemOptionError::DuplicateKey {
                    key: "flush-log".into(),
                },
            ),
            (
                "path=a,persist=flush,writeback-interval=100",
                PmemOptionError::WritebackNeedsAdr,
            ),
            (
                "path=a,readonly=on,persist=flush",
                PmemOptionError::ReadonlyWith { key: "persist" },
            ),
            (
                "path=a,readonly=on,persist=adr",
                PmemOptionError::ReadonlyWith { key: "persist" },
            ),
            (
                "path=a,writeback-interval=100,readonly=on",
                PmemOptionError::ReadonlyWith {
                    key: "writeback-interval",
                },
            ),
            (
                "path=a,readonly=on,flush-log=l",
                PmemOptionError::ReadonlyWith { key: "flush-log" },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&parse(input).unwrap_err(), want, "input {input:?}");
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            parse(&format!("path=a,id={long}")).unwrap_err(),
            PmemOptionError::IdTooLong {
                id: long.clone(),
                len: MAX_ID_LEN + 1
            }
        );
        assert!(parse(&format!("path=a,id={}", &long[1..])).is_ok());
        match parse("path=a,size=1.5G").unwrap_err() {
            PmemOptionError::BadSize { value, source } => {
                assert_eq!(value, "1.5G");
                assert!(matches!(source, SizeError::NotANumber { .. }));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn messages_name_the_culprit() {
        let msg = parse("path=a,b.img").unwrap_err().to_string();
        assert!(
            msg.contains("\"b.img\"") && msg.contains("commas inside paths"),
            "{msg}"
        );
        let msg = parse("path=a,hints=17").unwrap_err().to_string();
        assert!(msg.contains("\"17\"") && msg.contains("16"), "{msg}");
        let msg = parse("path=a,colour=red").unwrap_err().to_string();
        assert!(msg.contains("colour"), "{msg}");
        let msg = parse("path=a,writeback-interval=5")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("\"5\"") && msg.contains("10") && msg.contains("3600000"),
            "{msg}"
        );
    }

    #[test]
    fn set_checks_count_and_unique_ids() {
        let dev = |s: &str| parse(s).unwrap();
        assert!(validate_set(&[]).is_ok());
        assert!(validate_set(&[dev("path=a"), dev("path=b"), dev("path=c,id=x")]).is_ok());
        // An explicit id may collide with another device's default.
        let err = validate_set(&[dev("path=a,id=pmem1"), dev("path=b")]).unwrap_err();
        assert!(
            matches!(&err, PmemSetError::DuplicateId { id, first: 0, second: 1 } if id == "pmem1"),
            "{err:?}"
        );
        let err =
            validate_set(&[dev("path=a,id=x"), dev("path=b"), dev("path=c,id=x")]).unwrap_err();
        assert!(matches!(
            err,
            PmemSetError::DuplicateId {
                first: 0,
                second: 2,
                ..
            }
        ));
        let full: Vec<_> = (0..MAX_DEVICES)
            .map(|i| dev(&format!("path=f{i}")))
            .collect();
        assert!(validate_set(&full).is_ok());
        let mut over = full.clone();
        over.push(dev("path=extra"));
        let err = validate_set(&over).unwrap_err();
        assert!(matches!(
            err,
            PmemSetError::TooManyDevices { count: 17, max: 16 }
        ));
        assert!(err.to_string().contains("17") && err.to_string().contains("16"));
    }

    #[test]
    fn on_error_and_sparse() {
        let c = parse("path=a,on-error=exit,sparse=on").unwrap();
        assert_eq!((c.on_error, c.sparse), (OnError::Exit, true));
        assert_eq!(Display(&c).to_string(), "path=a,on-error=exit,sparse=on");
        assert_eq!(
            parse("path=a,on-error=stop").unwrap().on_error,
            OnError::Stop
        );
        assert_eq!(
            parse("path=a,on-error=ignore").unwrap_err(),
            PmemOptionError::BadOnError {
                value: "ignore".into()
            }
        );
        assert_eq!(
            parse("path=a,sparse=yes").unwrap_err(),
            PmemOptionError::BadSparse {
                value: "yes".into()
            }
        );
        assert!(matches!(
            parse("path=a,on-error=exit,on-error=stop").unwrap_err(),
            PmemOptionError::DuplicateKey { .. }
        ));
    }
}
