//! The client subcommands, `pmvm stats|flush|pause|resume|shutdown|power-cut`: each is one
//! or a few calls of [`Client`], printed for a person.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::api::client::{Client, ClientError};
use nvdimm::counters::{CounterDef, COUNTERS};

use crate::api::types::{FlushReport, PmemList, VmInfo};

/// Clears the terminal and homes the cursor, for `--watch`.
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";

/// A client subcommand, as the CLI parsed it.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientCommand {
    /// Per-device table, or with `json` the raw `GET /v1/pmem` document; `watch` repeats
    /// every so many seconds until interrupted.
    Stats {
        sock: PathBuf,
        json: bool,
        watch: Option<f64>,
    },
    /// Host-initiated writeback of one device, or of every device when `id` is `None`.
    Flush {
        sock: PathBuf,
        id: Option<String>,
    },
    Pause {
        sock: PathBuf,
    },
    Resume {
        sock: PathBuf,
    },
    Shutdown {
        sock: PathBuf,
    },
    /// Simulated power loss, through one device when `id` is given.
    PowerCut {
        sock: PathBuf,
        id: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("--watch takes a number of seconds between 0.1 and 86400; got {0}")]
    BadWatch(f64),
    #[error("writing the output failed")]
    Output(#[source] io::Error),
}

/// Runs one client subcommand, printing to stdout.
pub fn run_client(cmd: ClientCommand) -> Result<(), CommandError> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    run_to(&cmd, &mut out, None)
}

/// `rounds` bounds `--watch` for tests; `None` repeats until the process is interrupted.
fn run_to(
    cmd: &ClientCommand,
    out: &mut dyn Write,
    rounds: Option<usize>,
) -> Result<(), CommandError> {
    match cmd {
        ClientCommand::Stats {
            sock,
            json,
            watch: None,
        } => print_stats(sock, *json, out),
        ClientCommand::Stats {
            sock,
            json,
            watch: Some(secs),
        } => {
            let period = watch_period(*secs)?;
            let mut round = 0;
            while rounds.is_none_or(|r| round < r) {
                if round > 0 {
                    thread::sleep(period);
                }
                let mut screen = Vec::new();
                print_stats(sock, *json, &mut screen)?;
                write!(out, "{CLEAR_SCREEN}every {secs} s, Ctrl-C to stop\n\n")
                    .and_then(|_| out.write_all(&screen))
                    .and_then(|_| out.flush())
                    .map_err(CommandError::Output)?;
                round += 1;
            }
            Ok(())
        }
        ClientCommand::Flush { sock, id: Some(id) } => {
            let report = Client::new(sock).flush(id)?;
            writeln!(out, "{}", flush_line(id, &report)).map_err(CommandError::Output)
        }
        ClientCommand::Flush { sock, id: None } => {
            let client = Client::new(sock);
            let list = client.pmem_list()?;
            if list.devices.is_empty() {
                return writeln!(out, "no pmem devices").map_err(CommandError::Output);
            }
            // Flush every device even if one fails, then report the first failure.
            let mut first_err = None;
            for dev in &list.devices {
                match client.flush(&dev.id) {
                    Ok(report) => writeln!(out, "{}", flush_line(&dev.id, &report))
                        .map_err(CommandError::Output)?,
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            first_err.map_or(Ok(()), |e| Err(e.into()))
        }
        ClientCommand::Pause { sock } => action(sock, "pause", "paused", out),
        ClientCommand::Resume { sock } => action(sock, "resume", "resumed", out),
        ClientCommand::Shutdown { sock } => action(sock, "shutdown", "shutdown requested", out),
        ClientCommand::PowerCut { sock, id: None } => action(sock, "power-cut", "power cut", out),
        ClientCommand::PowerCut { sock, id: Some(id) } => {
            Client::new(sock).pmem_crash(id)?;
            writeln!(out, "power cut (through {id})").map_err(CommandError::Output)
        }
    }
}

fn watch_period(secs: f64) -> Result<Duration, CommandError> {
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(CommandError::BadWatch(secs));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| CommandError::BadWatch(secs))
}

fn print_stats(sock: &Path, json: bool, out: &mut dyn Write) -> Result<(), CommandError> {
    if json {
        // Printed as the server sent it, fields this client does not know included.
        let doc: serde_json::Value = Client::new(sock).get("/v1/pmem")?;
        let text = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string());
        return writeln!(out, "{text}").map_err(CommandError::Output);
    }
    let client = Client::new(sock);
    let vm = client.vm()?;
    let list = client.pmem_list()?;
    out.write_all(stats_table(&vm, &list).as_bytes())
        .map_err(CommandError::Output)
}

fn action(sock: &Path, verb: &str, done: &str, out: &mut dyn Write) -> Result<(), CommandError> {
    Client::new(sock).vm_action(verb)?;
    writeln!(out, "{done}").map_err(CommandError::Output)
}

fn flush_line(id: &str, r: &FlushReport) -> String {
    let runs = if r.runs == 1 { "run" } else { "runs" };
    let pages = if r.pages == 1 { "page" } else { "pages" };
    format!(
        "{id}: wrote {} {pages} ({} KiB) in {} {runs}, {} us",
        r.pages,
        r.bytes / 1024,
        r.runs,
        r.latency_us
    )
}

/// A writeback running this long is reported as blocked: a healthy one takes milliseconds.
const BLOCKED_AFTER_MS: u64 = 1000;

/// The `pmvm stats` table: a VM line, then one row per device.
pub fn stats_table(vm: &VmInfo, list: &PmemList) -> String {
    let mut text = format!(
        "VM {}, up {}, {} vCPU{}, {} MiB RAM\n",
        vm.state,
        fmt_uptime(vm.uptime_ms),
        vm.vcpus,
        if vm.vcpus == 1 { "" } else { "s" },
        vm.memory_bytes >> 20
    );
    if let Some(fault) = &vm.io_error {
        text.push_str(&format!("{}\n", fault.line()));
    }
    for w in vm
        .writebacks_in_progress
        .iter()
        .filter(|w| w.running_ms >= BLOCKED_AFTER_MS)
    {
        text.push_str(&format!(
            "{}: writeback for {} blocked for {:.1} s: the file system of its backing file is \
             not answering (frozen, or a hung mount)\n",
            w.device,
            w.by,
            w.running_ms as f64 / 1000.0
        ));
    }
    if list.devices.is_empty() {
        text.push_str("no pmem devices\n");
        return text;
    }
    // ID, the counters that have a column, latency, pending pages and tracking.
    let columns: Vec<&CounterDef> = COUNTERS.iter().filter(|c| c.column.is_some()).collect();
    let mut header = vec!["ID"];
    header.extend(columns.iter().filter_map(|c| Some(c.column?.header)));
    header.extend(["P50 us", "P99 us", "MAX us", "PENDING", "TRACKING"]);
    let rows: Vec<Vec<String>> = list
        .devices
        .iter()
        .map(|d| {
            let s = &d.stats;
            let mut row = vec![d.id.clone()];
            row.extend(
                columns
                    .iter()
                    .filter_map(|c| Some(c.column?.cell((c.get)(s)))),
            );
            row.extend([
                s.latency_us.p50.to_string(),
                s.latency_us.p99.to_string(),
                s.latency_us.max.to_string(),
                d.pending_dirty_pages
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
                d.dirty_tracking.to_string(),
            ]);
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, &w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                l.push_str(&format!("{cell:<w$}"));
            } else {
                l.push_str(&format!("  {cell:>w$}"));
            }
        }
        text.push_str(l.trim_end());
        text.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    text
}

fn fmt_uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::fake::{sample_devices, FakeVmm};
    use crate::api::server::ApiServer;
    use crate::api::VmmControl;

    #[test]
    fn stats_table_from_a_sample_document() {
        let fake = FakeVmm::new();
        let list = PmemList {
            devices: sample_devices(),
        };
        let text = stats_table(&fake.vm_info(), &list);
        let expected = "\
VM running, up 1m01s, 2 vCPUs, 512 MiB RAM
ID     FLUSHES  PAGES  MiB WRITTEN  P50 us  P99 us  MAX us  PENDING  TRACKING
pmem0        3    300         1.17      40     130     130        7      ring
pmem1        0      0         0.00       0       0       0        -      none
";
        assert_eq!(text, expected);
    }

    #[test]
    fn stats_table_without_devices_says_so() {
        let fake = FakeVmm::new();
        let text = stats_table(&fake.vm_info(), &PmemList::default());
        assert!(text.ends_with("\nno pmem devices\n"), "{text}");
    }

    #[test]
    fn uptime_and_flush_lines_read_naturally() {
        assert_eq!(fmt_uptime(999), "0s");
        assert_eq!(fmt_uptime(3_599_000), "59m59s");
        assert_eq!(fmt_uptime(3_600_000 * 26 + 61_000), "26h01m01s");
        let r = FlushReport {
            pages: 1,
            bytes: 4096,
            runs: 1,
            latency_us: 9,
        };
        assert_eq!(
            flush_line("pmem0", &r),
            "pmem0: wrote 1 page (4 KiB) in 1 run, 9 us"
        );
    }

    fn with_server(f: impl FnOnce(&Path)) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pmvm.sock");
        let server = ApiServer::start(&sock, Arc::new(FakeVmm::new())).unwrap();
        f(&sock);
        server.stop();
    }

    fn output(cmd: ClientCommand, rounds: Option<usize>) -> Result<String, CommandError> {
        let mut out = Vec::new();
        run_to(&cmd, &mut out, rounds)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn subcommands_against_a_real_server() {
        with_server(|sock| {
            let sock = sock.to_path_buf();
            let table = output(
                ClientCommand::Stats {
                    sock: sock.clone(),
                    json: false,
                    watch: None,
                },
                None,
            )
            .unwrap();
            assert!(table.contains("\npmem0        3    300"), "{table}");

            let json = output(
                ClientCommand::Stats {
                    sock: sock.clone(),
                    json: true,
                    watch: None,
                },
                None,
            )
            .unwrap();
            let doc: PmemList = serde_json::from_str(&json).unwrap();
            assert_eq!(doc.devices, sample_devices());
            assert!(json.contains("\n  \"devices\": ["), "not pretty: {json}");

            let flushed = output(
                ClientCommand::Flush {
                    sock: sock.clone(),
                    id: None,
                },
                None,
            )
            .unwrap();
            assert_eq!(
                flushed,
                "pmem0: wrote 4 pages (16 KiB) in 1 run, 25 us\npmem1: wrote 4 pages (16 KiB) in 1 run, 25 us\n"
            );
            let err = output(
                ClientCommand::Flush {
                    sock: sock.clone(),
                    id: Some("x y".into()),
                },
                None,
            )
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                "PUT /v1/pmem/x%20y/flush failed with 404: no pmem device with id \"x y\" (GET /v1/pmem lists them)"
            );

            assert_eq!(
                output(ClientCommand::Pause { sock: sock.clone() }, None).unwrap(),
                "paused\n"
            );
            let err = output(ClientCommand::Pause { sock: sock.clone() }, None).unwrap_err();
            assert_eq!(
                err.to_string(),
                "PUT /v1/vm/pause failed with 409: cannot pause the VM while it is paused"
            );
            assert_eq!(
                output(ClientCommand::Resume { sock: sock.clone() }, None).unwrap(),
                "resumed\n"
            );
            let err = output(
                ClientCommand::PowerCut {
                    sock: sock.clone(),
                    id: Some("x y".into()),
                },
                None,
            )
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                "PUT /v1/pmem/x%20y/crash failed with 404: no pmem device with id \"x y\" (GET /v1/pmem lists them)"
            );
            assert_eq!(
                output(ClientCommand::Shutdown { sock: sock.clone() }, None).unwrap(),
                "shutdown requested\n"
            );
            let err = output(
                ClientCommand::PowerCut {
                    sock: sock.clone(),
                    id: None,
                },
                None,
            )
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                "PUT /v1/vm/power-cut failed with 409: cannot cut the power of the VM while it is shutting_down"
            );
        });
    }

    #[test]
    fn watch_clears_and_reprints() {
        with_server(|sock| {
            let cmd = ClientCommand::Stats {
                sock: sock.into(),
                json: false,
                watch: Some(0.1),
            };
            let text = output(cmd, Some(2)).unwrap();
            assert_eq!(text.matches(CLEAR_SCREEN).count(), 2);
            assert_eq!(text.matches("\npmem1 ").count(), 2, "{text}");
        });
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            let cmd = ClientCommand::Stats {
                sock: "/nonexistent".into(),
                json: false,
                watch: Some(bad),
            };
            assert!(
                matches!(output(cmd, Some(1)), Err(CommandError::BadWatch(_))),
                "{bad}"
            );
        }
    }
}
