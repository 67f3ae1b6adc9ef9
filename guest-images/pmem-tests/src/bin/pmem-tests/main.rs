//! The guest fsync/msync suite. Run by the initramfs /init (or as /init itself): it sets up
//! fsdax namespaces on pmvm's NVDIMMs, runs every case of the plan, and reports each one on
//! the serial console for the host to verify. See docs/guest-suite.md.

mod system;

use std::path::{Path, PathBuf};

use pmem_tests::actions::{self, Place};
use pmem_tests::cases::Fs;
use pmem_tests::console::Console;
use pmem_tests::mapping::cache_line_writeback;
use pmem_tests::nd::{self, Nd, Pmem};
use pmem_tests::options::Options;
use pmem_tests::protocol::Event;
use pmem_tests::runner::{run_plan, Target};

fn main() {
    let init = std::process::id() == 1;
    let mut early = Vec::new();
    if init {
        early.extend(system::early_mounts());
        early.extend(system::load_modules());
        system::settle_nvdimms();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let code = match Options::parse(&cmdline) {
        Err(e) => {
            println!(
                "{}",
                Event::Abort(format!("bad kernel command line option {e}"))
            );
            2
        }
        Ok(opts) => match Console::serial(opts.ack && !opts.preflight, opts.timeout) {
            Err(e) => {
                println!(
                    "{}",
                    Event::Abort(format!("cannot open the console for acknowledgements: {e}"))
                );
                2
            }
            Ok(mut console) => {
                for line in early {
                    console.say(&Event::Info(line));
                }
                if opts.preflight {
                    preflight(&mut console)
                } else {
                    suite(&opts, &mut console)
                }
            }
        },
    };
    if init {
        system::power_off();
    }
    std::process::exit(code);
}

fn nvdimm_line(p: &Pmem) -> String {
    format!(
        "nvdimm dev={} {} base={:#x} size={} block={} holder={} data_offset={:#x}",
        p.index, p.region.name, p.region.base, p.region.size, p.block, p.holder, p.data_offset
    )
}

/// Proves user space runs and shows the NVDIMMs as the kernel found them, without changing
/// anything.
fn preflight(console: &mut Console) -> i32 {
    console.say(&Event::Info(format!(
        "preflight: user space runs on Linux {}",
        system::kernel_release()
    )));
    match Nd::new("/sys").regions() {
        Ok(regions) => {
            for (i, r) in regions.iter().enumerate() {
                console.say(&Event::Info(format!(
                    "nvdimm dev={i} {} base={:#x} size={} (preflight: not set up)",
                    r.name, r.base, r.size
                )));
            }
            console.say(&Event::Done {
                passed: 0,
                failed: 0,
                skipped: 0,
            });
            0
        }
        Err(e) => {
            console.say(&Event::Abort(e.to_string()));
            1
        }
    }
}

fn suite(opts: &Options, console: &mut Console) -> i32 {
    let plan = opts.plan();
    console.say(&Event::Start {
        cases: plan.len() as u32,
    });
    console.say(&Event::Info(format!(
        "kernel {} acks={} cache-line writeback={}",
        system::kernel_release(),
        if console.acks() { "on" } else { "off" },
        cache_line_writeback()
    )));
    let nd = Nd::new("/sys");
    let regions = match nd.regions() {
        Ok(r) => r,
        Err(e) => {
            console.say(&Event::Abort(e.to_string()));
            return 1;
        }
    };
    let needed: Vec<usize> = {
        let mut d: Vec<usize> = plan.iter().map(|(_, fs)| fs.device()).collect();
        d.dedup();
        d
    };
    let mut pmems: Vec<Result<Pmem, String>> = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        if !needed.contains(&i) {
            pmems.push(Err(format!(
                "{} is not used by the selected cases",
                region.name
            )));
            continue;
        }
        let res = nd::random_uuid()
            .map_err(|e| format!("getrandom: {e}"))
            .and_then(|uuid| {
                nd.ensure_fsdax(i as u32, region, &uuid)
                    .map_err(|e| e.to_string())
            });
        match &res {
            Ok(p) => console.say(&Event::Info(nvdimm_line(p))),
            Err(e) => console.say(&Event::Info(format!("nvdimm dev={i} {}: {e}", region.name))),
        }
        pmems.push(res);
    }

    let mut mounted: Vec<PathBuf> = Vec::new();
    let mut prepare = |fs: Fs, _: &mut Console| -> Result<Target, String> {
        let idx = fs.device();
        let pmem = match pmems.get(idx) {
            Some(Ok(p)) => p.clone(),
            Some(Err(e)) => return Err(format!("NVDIMM dev={idx}: {e}")),
            None => {
                return Err(format!(
                    "the guest has {} NVDIMM(s) and {fs} needs dev={idx}: start pmvm with two \
                     --pmem devices",
                    regions.len()
                ))
            }
        };
        let dev = pmem.dev_path();
        let place = match fs {
            Fs::Raw => {
                let size = system::block_size(&pmem.block)
                    .map_err(|e| format!("size of {}: {e}", pmem.block))?;
                if size < actions::raw_area_end() {
                    return Err(format!(
                        "{} is {size} bytes; the raw cases need {}",
                        pmem.block,
                        actions::raw_area_end()
                    ));
                }
                Place::Raw { dev }
            }
            Fs::Ext4 | Fs::Xfs => {
                let dir = Path::new("/mnt").join(fs.name());
                // A new round (pmemtests.repeat) starts on a fresh file system.
                if mounted.contains(&dir) {
                    system::umount(&dir)?;
                    mounted.retain(|d| d != &dir);
                }
                system::mkfs(fs.name(), &dev)?;
                system::mount_dax(fs.name(), &dev, &dir)?;
                mounted.push(dir.clone());
                Place::Dir {
                    path: dir,
                    dax: true,
                }
            }
        };
        Ok(Target {
            place,
            dev: pmem.index,
            data_offset: pmem.data_offset,
        })
    };
    let result = run_plan(&plan, console, &mut prepare);
    for dir in mounted {
        if let Err(e) = system::umount(&dir) {
            console.say(&Event::Info(e));
        }
    }
    match result {
        Ok(tally) => {
            for f in &tally.failures {
                console.say(&Event::Info(format!("failed: {f}")));
            }
            console.say(&Event::Done {
                passed: tally.passed,
                failed: tally.failed,
                skipped: tally.skipped,
            });
            i32::from(tally.failed > 0)
        }
        Err(why) => {
            console.say(&Event::Abort(why));
            1
        }
    }
}
