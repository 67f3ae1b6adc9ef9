//! A flush storm: the probe flushes 100,000 times in a tight loop on vCPU 0 (each flush with
//! one new dirty page) while vCPU 1 runs `counter`. pmvm must stay responsive (95% of API
//! requests answered within 100 ms, none waiting a second, beyond what the host's scheduler
//! adds: the test's own oversleep, measured in the same loop, counts twice, once per process
//! woken), the counter must keep going, and the stats must count every flush. How long the storm takes depends on the host's disk and
//! load, so only a storm that stops advancing fails; its rate against the host's own
//! fdatasync rate is printed.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pmvm_tests::{kvm_or_skip, probe_elf, wait_api, Client, Pmvm};

const FLUSHES: u64 = 100_000;
const API_LIMIT: Duration = Duration::from_millis(100);
/// No request may wait this long: that would be the API blocked behind the flushes.
const API_WORST: Duration = Duration::from_secs(1);
/// Between two API requests.
const PAUSE: Duration = Duration::from_millis(50);
/// A storm whose flush count stands still this long has stalled.
const STALL: Duration = Duration::from_secs(60);

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// Sorts `d` and returns its 95th percentile and maximum.
fn p95_and_worst(d: &mut [Duration]) -> (Duration, Duration) {
    d.sort();
    (d[d.len() * 95 / 100], d[d.len() - 1])
}

fn counter_lines(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with("probe: cpu1: counter "))
        .count()
}

#[test]
fn a_flush_storm_keeps_pmvm_responsive_and_counts_every_flush() {
    if !kvm_or_skip("flush storm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let img = dir.path().join("p.img");
    let args = vec![
        "--kernel".to_string(),
        probe_elf().display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--cmdline".into(),
        format!("console=ttyS0 -- on 1 counter readline storm 0 {FLUSHES} mark STORMED wait"),
        "--pmem".into(),
        format!("path={},size=64M", img.display()),
        "--api-sock".into(),
        sock.display().to_string(),
    ];
    let mut vm = Pmvm::spawn_with_input(&pmvm(), &args);
    wait_api(&sock, Duration::from_secs(60)).unwrap();
    vm.wait_for("probe: cpu1: counter 1", Duration::from_secs(60))
        .unwrap();
    vm.wait_for("probe: reading", Duration::from_secs(60))
        .unwrap();

    let counter_before = counter_lines(&vm.lines());
    vm.send(b"go\n").unwrap();
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut oversleeps = Vec::new();
    let mut seen_mid_storm = 0;
    let (mut last_count, mut last_change) = (0, Instant::now());
    while !vm.lines().iter().any(|l| l == "probe: MARK STORMED") {
        assert!(
            last_change.elapsed() < STALL,
            "the storm stalled at {last_count} flushes: no flush for {STALL:?}\n{}",
            vm.transcript()
        );
        let t = Instant::now();
        let flushes = Client::new(&sock).pmem("pmem0").unwrap().stats.flushes;
        latencies.push(t.elapsed());
        if flushes > 0 && flushes < FLUSHES {
            seen_mid_storm += 1;
        }
        if flushes != last_count {
            (last_count, last_change) = (flushes, Instant::now());
        }
        let nap = Instant::now();
        std::thread::sleep(PAUSE);
        oversleeps.push(nap.elapsed().saturating_sub(PAUSE));
    }
    let storm = started.elapsed();
    let counter_during = counter_lines(&vm.lines()) - counter_before;

    let d = Client::new(&sock).pmem("pmem0").unwrap();
    assert_eq!(d.stats.flushes, FLUSHES, "{d:?}");
    assert_eq!(d.stats.pages_written, FLUSHES, "one page per flush: {d:?}");
    assert_eq!(d.stats.errors, 0, "{d:?}");
    assert!(seen_mid_storm > 0, "no API request landed during the storm");
    let (p95, worst) = p95_and_worst(&mut latencies);
    let (host_p95, host_worst) = p95_and_worst(&mut oversleeps);
    let (p95_limit, worst_limit) = (API_LIMIT + 2 * host_p95, API_WORST + 2 * host_worst);
    assert!(
        p95 < p95_limit && worst < worst_limit,
        "API requests during the storm: 95th percentile {p95:?} (limit {p95_limit:?}), worst \
         {worst:?} (limit {worst_limit:?}); {} requests; the host's scheduler delayed this \
         test's wake-ups by {host_p95:?} (95th percentile), {host_worst:?} at worst",
        latencies.len()
    );
    assert!(
        counter_during >= 2,
        "vCPU 1's counter advanced only {counter_during} times in {storm:?}"
    );

    // The host alone: the same one-page write and fdatasync, on a file beside the image.
    let host = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("host.img"))
        .unwrap();
    host.set_len(16 * 4096).unwrap();
    let host_rounds = 5_000u64;
    let t = Instant::now();
    for i in 0..host_rounds {
        host.write_all_at(&[i as u8], (i % 16) * 4096).unwrap();
        host.sync_data().unwrap();
    }
    let host_rate = host_rounds as f64 / t.elapsed().as_secs_f64();
    let pmvm_rate = FLUSHES as f64 / storm.as_secs_f64();
    println!(
        "flush storm: pmvm {pmvm_rate:.0} flushes/s ({FLUSHES} in {:.1} s, one dirty page each), \
         host write+fdatasync {host_rate:.0}/s, ratio {:.2}; API p95 {p95:?}, worst {worst:?} \
         over {} requests; vCPU 1 counted {counter_during} times",
        storm.as_secs_f64(),
        pmvm_rate / host_rate,
        latencies.len()
    );

    vm.signal(libc::SIGTERM);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
}
