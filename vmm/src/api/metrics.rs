//! `GET /metrics`: the VM and pmem counters in the Prometheus text exposition format
//! (version 0.0.4). Times are in seconds, the Prometheus base unit, everywhere.

use std::fmt::Write;

use nvdimm::counters::COUNTERS;

use super::types::{PmemInfo, PmemStats, VmInfo, VmState};

/// A metric name, its help text, and the stats field it reports.
type StatField = (&'static str, &'static str, fn(&PmemStats) -> u64);

/// Renders every metric family once, with one sample per device.
pub fn render_metrics(vm: &VmInfo, devices: &[PmemInfo]) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "pmvm_vm_uptime_seconds",
        "gauge",
        "Time since the VM was created.",
    );
    sample(
        &mut out,
        "pmvm_vm_uptime_seconds",
        &[],
        &secs_from_ms(vm.uptime_ms),
    );
    family(
        &mut out,
        "pmvm_vm_state",
        "gauge",
        "1 for the state the VM is in, 0 for the others.",
    );
    for state in [
        VmState::Running,
        VmState::Paused,
        VmState::IoError,
        VmState::ShuttingDown,
    ] {
        let value = u64::from(vm.state == state);
        sample(
            &mut out,
            "pmvm_vm_state",
            &[("state", &state.to_string())],
            &value.to_string(),
        );
    }
    family(&mut out, "pmvm_vm_vcpus", "gauge", "Number of vCPUs.");
    sample(&mut out, "pmvm_vm_vcpus", &[], &vm.vcpus.to_string());
    family(
        &mut out,
        "pmvm_vm_memory_bytes",
        "gauge",
        "Guest RAM, not counting NVDIMMs.",
    );
    sample(
        &mut out,
        "pmvm_vm_memory_bytes",
        &[],
        &vm.memory_bytes.to_string(),
    );

    per_device(
        &mut out,
        devices,
        "pmvm_pmem_size_bytes",
        "gauge",
        "Size of the device.",
        |d| Some(d.size_bytes.to_string()),
    );
    per_device(
        &mut out,
        devices,
        "pmvm_pmem_io_error",
        "gauge",
        "The errno of the failure that keeps the device from acknowledging flushes; 0 if none.",
        |d| Some(d.io_error.as_ref().map_or(0, |f| f.errno).to_string()),
    );
    per_device(
        &mut out,
        devices,
        "pmvm_pmem_readonly",
        "gauge",
        "1 if the guest cannot write the device.",
        |d| Some(u64::from(d.readonly).to_string()),
    );
    for c in COUNTERS {
        per_device(&mut out, devices, c.metric, "counter", c.help, |d| {
            Some(c.unit.metric_value((c.get)(&d.stats)))
        });
    }
    per_device(
        &mut out,
        devices,
        "pmvm_pmem_last_harvest_pages",
        "gauge",
        "Dirty pages found by the latest harvest.",
        |d| Some(d.stats.last_harvest_pages.to_string()),
    );
    per_device(
        &mut out,
        devices,
        "pmvm_pmem_pending_dirty_pages",
        "gauge",
        "Pages dirtied since the last writeback.",
        |d| d.pending_dirty_pages.map(|p| p.to_string()),
    );
    let quantiles: [StatField; 3] = [
        (
            "pmvm_pmem_flush_latency_p50_seconds",
            "Median guest flush writeback latency.",
            |s| s.latency_us.p50,
        ),
        (
            "pmvm_pmem_flush_latency_p99_seconds",
            "99th percentile guest flush writeback latency.",
            |s| s.latency_us.p99,
        ),
        (
            "pmvm_pmem_flush_latency_max_seconds",
            "Longest guest flush writeback.",
            |s| s.latency_us.max,
        ),
    ];
    for (name, help, get) in quantiles {
        per_device(&mut out, devices, name, "gauge", help, |d| {
            Some(secs_from_us(get(&d.stats)))
        });
    }
    latency_histogram(&mut out, devices);
    out
}

/// `histogram[i]` holds whole microseconds in [2^i, 2^(i+1)), so its inclusive upper bound
/// is 2^(i+1) - 1 µs; Prometheus buckets are cumulative and end with `+Inf`. The stats carry
/// no sum of latencies, so `_sum` is left out (the format tolerates that; quantiles come
/// from the buckets).
fn latency_histogram(out: &mut String, devices: &[PmemInfo]) {
    let name = "pmvm_pmem_flush_latency_seconds";
    family(
        out,
        name,
        "histogram",
        "Guest flush writeback latency, harvest to durable.",
    );
    let bucket = format!("{name}_bucket");
    for d in devices {
        let mut total: u64 = 0;
        for (i, count) in d.stats.latency_us.histogram.iter().enumerate() {
            total = total.saturating_add(*count);
            let le_us = 2f64.powi(i32::try_from(i + 1).unwrap_or(i32::MAX)) - 1.0;
            let le = (le_us / 1e6).to_string();
            sample(
                out,
                &bucket,
                &[("id", &d.id), ("le", &le)],
                &total.to_string(),
            );
        }
        sample(
            out,
            &bucket,
            &[("id", &d.id), ("le", "+Inf")],
            &total.to_string(),
        );
        sample(
            out,
            &format!("{name}_count"),
            &[("id", &d.id)],
            &total.to_string(),
        );
    }
}

fn per_device(
    out: &mut String,
    devices: &[PmemInfo],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&PmemInfo) -> Option<String>,
) {
    family(out, name, kind, help);
    for d in devices {
        if let Some(v) = value(d) {
            sample(out, name, &[("id", &d.id)], &v);
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn secs_from_us(us: u64) -> String {
    (us as f64 / 1e6).to_string()
}

fn secs_from_ms(ms: u64) -> String {
    (ms as f64 / 1e3).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::fake::{sample_devices, FakeVmm};
    use super::super::VmmControl;
    use super::*;

    fn render() -> String {
        let fake = FakeVmm::new();
        render_metrics(&fake.vm_info(), &fake.pmem_list())
    }

    #[test]
    fn counters_carry_the_device_id_and_value() {
        let text = render();
        for line in [
            "pmvm_pmem_flushes_total{id=\"pmem0\"} 3",
            "pmvm_pmem_flushes_total{id=\"pmem1\"} 0",
            "pmvm_pmem_bytes_written_total{id=\"pmem0\"} 1228800",
            "pmvm_pmem_pending_dirty_pages{id=\"pmem0\"} 7",
            "pmvm_pmem_flush_latency_p99_seconds{id=\"pmem0\"} 0.00013",
            "pmvm_pmem_readonly{id=\"pmem1\"} 1",
            "pmvm_vm_state{state=\"running\"} 1",
            "pmvm_vm_state{state=\"paused\"} 0",
            "pmvm_vm_uptime_seconds 61.5",
            "# TYPE pmvm_pmem_flushes_total counter",
            "# TYPE pmvm_pmem_flush_latency_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Unknown pending pages are left out rather than reported as 0.
        assert!(!text.contains("pmvm_pmem_pending_dirty_pages{id=\"pmem1\"}"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inclusive_bounds() {
        let text = render();
        // pmem0: one sample each in [32,64), [64,128), [128,256) µs.
        for line in [
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem0\",le=\"0.000001\"} 0",
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem0\",le=\"0.000031\"} 0",
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem0\",le=\"0.000063\"} 1",
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem0\",le=\"0.000127\"} 2",
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem0\",le=\"0.000255\"} 3",
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem0\",le=\"+Inf\"} 3",
            "pmvm_pmem_flush_latency_seconds_count{id=\"pmem0\"} 3",
            "pmvm_pmem_flush_latency_seconds_bucket{id=\"pmem1\",le=\"+Inf\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn every_family_is_declared_once_and_its_samples_follow_it() {
        let text = render();
        let mut declared = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name.clone());
                current = name;
            } else if !line.starts_with('#') {
                let metric = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s))
                    .filter(|b| *b == current)
                    .unwrap_or(metric);
                assert_eq!(base, current, "sample {line:?} outside its family");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line:?}: value not a number");
            }
        }
        assert!(declared.len() > 15);
    }

    #[test]
    fn every_stats_counter_is_exported() {
        let mut devices = sample_devices();
        let s = &mut devices[0].stats;
        s.outside_writes = 4;
        s.writebacks = 9;
        s.errors = 2;
        s.background_flushes = 11;
        s.background_pages = 6;
        s.log_epochs = 5;
        s.writeback_ns = 2_500_000;
        let fake = FakeVmm::new();
        let text = render_metrics(&fake.vm_info(), &devices);
        for line in [
            "pmvm_pmem_outside_writes_total{id=\"pmem0\"} 4",
            "pmvm_pmem_writebacks_total{id=\"pmem0\"} 9",
            "pmvm_pmem_writeback_errors_total{id=\"pmem0\"} 2",
            "pmvm_pmem_writeback_errors_total{id=\"pmem1\"} 0",
            "# TYPE pmvm_pmem_writeback_errors_total counter",
            "pmvm_pmem_background_writebacks_total{id=\"pmem0\"} 11",
            "pmvm_pmem_background_pages_total{id=\"pmem0\"} 6",
            "pmvm_pmem_flush_log_epochs_total{id=\"pmem0\"} 5",
            "pmvm_pmem_flush_log_epochs_total{id=\"pmem1\"} 0",
            "pmvm_pmem_writeback_seconds_total{id=\"pmem0\"} 0.0025",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut devices = sample_devices();
        devices[0].id = "a\"b\\c\nd".into();
        let fake = FakeVmm::new();
        let text = render_metrics(&fake.vm_info(), &devices);
        assert!(
            text.contains("pmvm_pmem_flushes_total{id=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
    }
}
