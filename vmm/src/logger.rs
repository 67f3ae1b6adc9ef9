//! Log lines on stderr, for messages that are not the VM's fatal exit line: warnings from the
//! devices, failed flushes. `PMVM_LOG=error|warn|info|debug|trace` sets the level (warn).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            eprintln!("pmvm: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// The level `PMVM_LOG` names, or warn.
fn level_from(value: Option<&str>) -> LevelFilter {
    value
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn)
}

/// Installs the logger once, at start-up.
pub fn init() {
    // `log` needs a 'static logger; it holds no state, so nothing is shared through it.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level_from(std::env::var("PMVM_LOG").ok().as_deref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_comes_from_the_environment_value() {
        assert_eq!(level_from(None), LevelFilter::Warn);
        assert_eq!(level_from(Some("debug")), LevelFilter::Debug);
        assert_eq!(level_from(Some("TRACE")), LevelFilter::Trace);
        assert_eq!(level_from(Some("loud")), LevelFilter::Warn);
    }
}
