//! `--pmem` device configuration: `path=FILE[,size=SIZE][,id=NAME][,readonly=on|off][,hints=N]`
//! `[,persist=adr|flush][,writeback-interval=MS][,flush-log=PATH][,on-error=stop|exit]`
//! `[,sparse=on|off]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::size::{format_size, parse_size, SizeError};
use crate::{NvdimmError, MAX_DEVICES, MAX_HINTS, MAX_ID_LEN};

/// One `--pmem` device as the user described it. Checks that need the file are in `backing`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmemConfig {
    /// Backing file; created sparse if missing and `size` is given.
    pub path: PathBuf,
    /// Bytes exposed to the guest; defaults to the file length.
    pub size: Option<u64>,
    /// Name in the API and logs; defaults to `pmem<index>`.
    pub id: Option<String>,
    /// Map the file read-only: guest writes exit to the VMM and are dropped.
    pub readonly: bool,
    /// Number of flush-hint addresses to advertise; the VMM's default if unset.
    pub hints: Option<u32>,
    /// Which persistence model the device follows.
    pub persist: PersistMode,
    /// `adr` only: write back what the guest dirtied this often, flush or not.
    pub writeback_interval: Option<Duration>,
    /// Append every flush's pages to this flush-epoch log.
    pub flush_log: Option<PathBuf>,
    /// What the VM does when a flush of this device fails.
    pub on_error: OnError,
    /// Leave a file this device creates sparse instead of allocating it (a full file system
    /// then fails guest stores, not the start).
    pub sparse: bool,
}

/// What happens to the VM when a flush cannot be made durable. Either way the flushing vCPU
/// never sees its flush complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Pause in the `io-error` state; `resume` retries (QEMU's `werror=stop`).
    #[default]
    Stop,
    /// Stop pmvm with its own exit status.
    Exit,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Stop => "stop",
            OnError::Exit => "exit",
        }
    }
}

/// When guest stores reach the backing file. On the wire: `adr` or `flush`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersistMode {
    /// The guest's view is the file's page cache (a shared mapping): every store is in the
    /// file at once, and a flush makes the dirtied pages durable on disk.
    #[default]
    Adr,
    /// The guest's view is a private copy: the file changes only at flushes, which write the
    /// dirtied pages into it. The file is always the durable image as of the last flush.
    Flush,
}

impl PersistMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PersistMode::Adr => "adr",
            PersistMode::Flush => "flush",
        }
    }
}

impl fmt::Display for PersistMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bounds of `writeback-interval=`, in milliseconds: often enough to matter, rarely enough not
/// to turn the writeback thread into a busy loop.
pub const MIN_WRITEBACK_INTERVAL_MS: u64 = 10;
pub const MAX_WRITEBACK_INTERVAL_MS: u64 = 3_600_000;

/// Why a `--pmem` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
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

impl PmemConfig {
    /// The id, or `pmem<index>` where `index` is the device's position on the command line.
    pub fn id_or_default(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("pmem{index}"))
    }
}

impl FromStr for PmemConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ConfigError::Empty);
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
            let (key, value) = segment
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue {
                    segment: segment.to_string(),
                })?;
            let duplicate = || ConfigError::DuplicateKey {
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
                    let on = parse_on_off(value).map_err(|_| ConfigError::BadSparse {
                        value: value.to_string(),
                    })?;
                    set_once(&mut sparse, on).ok_or_else(duplicate)?
                }
                _ => {
                    return Err(ConfigError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            }
        }
        let config = PmemConfig {
            path: path.ok_or(ConfigError::MissingPath)?,
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
        config.check_combination(persist.is_some())?;
        Ok(config)
    }
}

impl PmemConfig {
    /// Options that are each valid but make no sense together.
    fn check_combination(&self, persist_given: bool) -> Result<(), ConfigError> {
        if self.readonly {
            let key = if persist_given {
                Some("persist")
            } else if self.writeback_interval.is_some() {
                Some("writeback-interval")
            } else if self.flush_log.is_some() {
                Some("flush-log")
            } else {
                None
            };
            if let Some(key) = key {
                return Err(ConfigError::ReadonlyWith { key });
            }
        }
        if self.writeback_interval.is_some() && self.persist != PersistMode::Adr {
            return Err(ConfigError::WritebackNeedsAdr);
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

fn parse_path(value: &str) -> Result<PathBuf, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::EmptyPath);
    }
    Ok(PathBuf::from(value))
}

fn parse_config_size(value: &str) -> Result<u64, ConfigError> {
    parse_size(value).map_err(|source| ConfigError::BadSize {
        value: value.to_string(),
        source,
    })
}

fn parse_id(value: &str) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::EmptyId);
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(ConfigError::BadIdChar {
            id: value.to_string(),
            bad,
        });
    }
    if value.len() > MAX_ID_LEN {
        return Err(ConfigError::IdTooLong {
            id: value.to_string(),
            len: value.len(),
        });
    }
    Ok(value.to_string())
}

fn parse_on_off(value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(ConfigError::BadReadonly {
            value: value.to_string(),
        }),
    }
}

fn parse_persist(value: &str) -> Result<PersistMode, ConfigError> {
    match value {
        "adr" => Ok(PersistMode::Adr),
        "flush" => Ok(PersistMode::Flush),
        _ => Err(ConfigError::BadPersist {
            value: value.to_string(),
        }),
    }
}

fn parse_on_error(value: &str) -> Result<OnError, ConfigError> {
    match value {
        "stop" => Ok(OnError::Stop),
        "exit" => Ok(OnError::Exit),
        _ => Err(ConfigError::BadOnError {
            value: value.to_string(),
        }),
    }
}

fn parse_interval(value: &str) -> Result<Duration, ConfigError> {
    match value.parse::<u64>() {
        Ok(ms) if (MIN_WRITEBACK_INTERVAL_MS..=MAX_WRITEBACK_INTERVAL_MS).contains(&ms) => {
            Ok(Duration::from_millis(ms))
        }
        _ => Err(ConfigError::BadWritebackInterval {
            value: value.to_string(),
        }),
    }
}

fn parse_flush_log(value: &str) -> Result<PathBuf, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::EmptyFlushLog);
    }
    Ok(PathBuf::from(value))
}

fn parse_hints(value: &str) -> Result<u32, ConfigError> {
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_HINTS).contains(&n) => Ok(n),
        _ => Err(ConfigError::BadHints {
            value: value.to_string(),
        }),
    }
}

/// Writes the `--pmem` form back, so messages can quote a device as the user would write it.
impl fmt::Display for PmemConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "path={}", self.path.display())?;
        if let Some(size) = self.size {
            write!(f, ",size={}", format_size(size))?;
        }
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        if self.readonly {
            write!(f, ",readonly=on")?;
        }
        if let Some(hints) = self.hints {
            write!(f, ",hints={hints}")?;
        }
        if self.persist != PersistMode::Adr {
            write!(f, ",persist={}", self.persist)?;
        }
        if let Some(interval) = self.writeback_interval {
            write!(f, ",writeback-interval={}", interval.as_millis())?;
        }
        if let Some(log) = &self.flush_log {
            write!(f, ",flush-log={}", log.display())?;
        }
        if self.on_error != OnError::Stop {
            write!(f, ",on-error={}", self.on_error.as_str())?;
        }
        if self.sparse {
            write!(f, ",sparse=on")?;
        }
        Ok(())
    }
}

/// Checks that need the whole set of devices: how many there are, and that ids are unique.
pub fn validate_set(configs: &[PmemConfig]) -> Result<(), NvdimmError> {
    if configs.len() > MAX_DEVICES {
        return Err(NvdimmError::TooManyDevices {
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
            return Err(NvdimmError::DuplicateId {
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

    fn parse(s: &str) -> Result<PmemConfig, ConfigError> {
        s.parse()
    }

    #[test]
    fn path_only_takes_defaults() {
        let c = parse("path=/tmp/pmem.img").unwrap();
        assert_eq!(
            c,
            PmemConfig {
                path: "/tmp/pmem.img".into(),
                size: None,
                id: None,
                readonly: false,
                hints: None,
                persist: PersistMode::Adr,
                writeback_interval: None,
                flush_log: None,
                on_error: OnError::Stop,
                sparse: false,
            }
        );
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
        assert_eq!(parse("path=x,persist=adr").unwrap().to_string(), "path=x");
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
            assert_eq!(c.to_string(), s);
            assert_eq!(parse(&c.to_string()).unwrap(), c);
        }
    }

    #[test]
    fn every_error() {
        let cases: &[(&str, ConfigError)] = &[
            ("", ConfigError::Empty),
            (
                "path=a,b.img",
                ConfigError::NotKeyValue {
                    segment: "b.img".into(),
                },
            ),
            (
                "path=a,,size=2M",
                ConfigError::NotKeyValue { segment: "".into() },
            ),
            (
                "path=a,colour=red",
                ConfigError::UnknownKey {
                    key: "colour".into(),
                },
            ),
            (
                "path=a,Path=b",
                ConfigError::UnknownKey { key: "Path".into() },
            ),
            (
                "path=a,path=b",
                ConfigError::DuplicateKey { key: "path".into() },
            ),
            (
                "path=a,size=2M,size=4M",
                ConfigError::DuplicateKey { key: "size".into() },
            ),
            (
                "path=a,id=x,id=y",
                ConfigError::DuplicateKey { key: "id".into() },
            ),
            (
                "path=a,readonly=on,readonly=on",
                ConfigError::DuplicateKey {
                    key: "readonly".into(),
                },
            ),
            (
                "path=a,hints=1,hints=2",
                ConfigError::DuplicateKey {
                    key: "hints".into(),
                },
            ),
            ("size=2M", ConfigError::MissingPath),
            ("path=", ConfigError::EmptyPath),
            ("path=a,id=", ConfigError::EmptyId),
            (
                "path=a,id=my.dev",
                ConfigError::BadIdChar {
                    id: "my.dev".into(),
                    bad: '.',
                },
            ),
            (
                "path=a,id=dév",
                ConfigError::BadIdChar {
                    id: "dév".into(),
                    bad: 'é',
                },
            ),
            (
                "path=a,readonly=yes",
                ConfigError::BadReadonly {
                    value: "yes".into(),
                },
            ),
            (
                "path=a,readonly=",
                ConfigError::BadReadonly { value: "".into() },
            ),
            (
                "path=a,hints=0",
                ConfigError::BadHints { value: "0".into() },
            ),
            (
                "path=a,hints=17",
                ConfigError::BadHints { value: "17".into() },
            ),
            (
                "path=a,hints=many",
                ConfigError::BadHints {
                    value: "many".into(),
                },
            ),
            (
                "path=a,hints=-1",
                ConfigError::BadHints { value: "-1".into() },
            ),
            (
                "path=a,persist=eadr",
                ConfigError::BadPersist {
                    value: "eadr".into(),
                },
            ),
            (
                "path=a,persist=adr,persist=flush",
                ConfigError::DuplicateKey {
                    key: "persist".into(),
                },
            ),
            (
                "path=a,writeback-interval=9",
                ConfigError::BadWritebackInterval { value: "9".into() },
            ),
            (
                "path=a,writeback-interval=3600001",
                ConfigError::BadWritebackInterval {
                    value: "3600001".into(),
                },
            ),
            (
                "path=a,writeback-interval=1s",
                ConfigError::BadWritebackInterval { value: "1s".into() },
            ),
            ("path=a,flush-log=", ConfigError::EmptyFlushLog),
            (
                "path=a,flush-log=x,flush-log=y",
                ConfigError::DuplicateKey {
                    key: "flush-log".into(),
                },
            ),
            (
                "path=a,persist=flush,writeback-interval=100",
                ConfigError::WritebackNeedsAdr,
            ),
            (
                "path=a,readonly=on,persist=flush",
                ConfigError::ReadonlyWith { key: "persist" },
            ),
            (
                "path=a,readonly=on,persist=adr",
                ConfigError::ReadonlyWith { key: "persist" },
            ),
            (
                "path=a,writeback-interval=100,readonly=on",
                ConfigError::ReadonlyWith {
                    key: "writeback-interval",
                },
            ),
            (
                "path=a,readonly=on,flush-log=l",
                ConfigError::ReadonlyWith { key: "flush-log" },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&parse(input).unwrap_err(), want, "input {input:?}");
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            parse(&format!("path=a,id={long}")).unwrap_err(),
            ConfigError::IdTooLong {
                id: long.clone(),
                len: MAX_ID_LEN + 1
            }
        );
        assert!(parse(&format!("path=a,id={}", &long[1..])).is_ok());
        match parse("path=a,size=1.5G").unwrap_err() {
            ConfigError::BadSize { value, source } => {
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
            matches!(&err, NvdimmError::DuplicateId { id, first: 0, second: 1 } if id == "pmem1"),
            "{err:?}"
        );
        let err =
            validate_set(&[dev("path=a,id=x"), dev("path=b"), dev("path=c,id=x")]).unwrap_err();
        assert!(matches!(
            err,
            NvdimmError::DuplicateId {
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
            NvdimmError::TooManyDevices { count: 17, max: 16 }
        ));
        assert!(err.to_string().contains("17") && err.to_string().contains("16"));
    }

    #[test]
    fn on_error_and_sparse() {
        let c = parse("path=a,on-error=exit,sparse=on").unwrap();
        assert_eq!((c.on_error, c.sparse), (OnError::Exit, true));
        assert_eq!(c.to_string(), "path=a,on-error=exit,sparse=on");
        assert_eq!(
            parse("path=a,on-error=stop").unwrap().on_error,
            OnError::Stop
        );
        assert_eq!(
            parse("path=a,on-error=ignore").unwrap_err(),
            ConfigError::BadOnError {
                value: "ignore".into()
            }
        );
        assert_eq!(
            parse("path=a,sparse=yes").unwrap_err(),
            ConfigError::BadSparse {
                value: "yes".into()
            }
        );
        assert!(matches!(
            parse("path=a,on-error=exit,on-error=stop").unwrap_err(),
            ConfigError::DuplicateKey { .. }
        ));
    }
}
