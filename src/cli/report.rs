//! The reporting commands: `info` (an image's chain, as text, our JSON or
//! qemu-img's), `map` (where each run of the disk lives) and `list` (the
//! active mounts and NBD servers).

use std::io::Write;
use std::path::PathBuf;

use super::config::ChainConfig;
use super::options::MountOptions;
use super::{ChainArgs, InfoArgs, ListArgs, MapArgs};
use crate::cache::Caches;
use crate::chain::Chain;
use crate::daemon;
use crate::error::{Error, Result};
use crate::info;

/// Cache of the reporting commands: they read metadata once.
const REPORT_CACHE: usize = 64 << 20;

/// Opens `image`'s chain as `args` says (the remote layer set up first if
/// it is a URL).
fn open_chain(image: &std::path::Path, args: &ChainArgs) -> Result<Chain> {
    let cfg = ChainConfig::new(args, &mut MountOptions::default())?;
    let budget = cfg.remote.apply(REPORT_CACHE, std::iter::once(image))?;
    Chain::open(image, &cfg.options(), &Caches::new(budget))
}

/// Runs `vdiskfs info`.
pub fn info_cmd(args: &InfoArgs) -> Result<()> {
    let chain = open_chain(&args.image, &args.chain)?;
    let report = info::gather(&chain)?;
    let text = if args.json {
        info::to_json(&report) + "\n"
    } else if args.output.as_deref() == Some("json") {
        let v = info::qemu::to_qemu_json(&chain, args.backing_chain);
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    } else {
        info::to_text(&report, args.verbose)
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    // The report is printed whole; the exit status still says the image is
    // damaged, so that `vdiskfs info IMG && use IMG` stops there.
    // The damage names its file (any link of the chain) already.
    if let Some(damage) = report.chain.iter().find_map(|l| l.damage.as_ref()) {
        return Err(Error::corrupt(format!("damaged: {damage}")));
    }
    Ok(())
}

/// Runs `vdiskfs map`.
pub fn map_cmd(args: &MapArgs) -> Result<()> {
    let chain = open_chain(&args.image, &args.chain)?;
    let entries = crate::map::map(&chain)?;
    let text = if args.output == "json" {
        crate::map::to_json(&entries)
    } else {
        crate::map::to_human(&entries)
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}

/// Runs `vdiskfs list`.
pub fn list_cmd(args: &ListArgs) -> Result<()> {
    let entries = daemon::list_states();
    if args.json {
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|(m, st)| {
                serde_json::json!({
                    "mountpoint": m.mountpoint,
                    "images": st.as_ref().map(|s| s.images.clone()).unwrap_or_else(|| vec![PathBuf::from(&m.source)]),
                    "mode": st.as_ref().map(|s| s.mode.clone()).unwrap_or_else(|| "unknown".into()),
                    "pid": st.as_ref().map(|s| s.pid),
                    "transport": st.as_ref().and_then(|s| s.transport.clone()),
                    "nbd": st.as_ref().map(|s| s.nbd.clone()).unwrap_or_default(),
                })
            })
            .chain(daemon::serve_states().iter().map(|s| {
                serde_json::json!({
                    "mountpoint": null,
                    "images": s.images,
                    "mode": s.mode,
                    "pid": s.pid,
                    "nbd": s.nbd,
                })
            }))
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<30} {:<8} {:>8}  {:<9} IMAGES",
        "MOUNTPOINT", "MODE", "PID", "TRANSPORT"
    );
    for (m, st) in entries {
        let nbd = st.as_ref().map(|s| s.nbd.clone()).unwrap_or_default();
        let transport = st
            .as_ref()
            .and_then(|s| s.transport.clone())
            .unwrap_or_else(|| "?".into());
        let (mode, pid, images) = match st {
            Some(s) => (
                s.mode,
                s.pid.to_string(),
                s.images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            None => ("?".into(), "-".into(), m.source.clone()),
        };
        println!(
            "{:<30} {:<8} {:>8}  {:<9} {}",
            m.mountpoint.display(),
            mode,
            pid,
            transport,
            images
        );
        for u in nbd {
            println!("{:<30} {:<8} {:>8}  nbd: {u}", "", "", "");
        }
    }
    for s in daemon::serve_states() {
        let images: Vec<String> = s.images.iter().map(|p| p.display().to_string()).collect();
        println!(
            "{:<30} {:<8} {:>8}  {}",
            "(nbd serve)",
            s.mode,
            s.pid,
            images.join(" ")
        );
        for u in s.nbd {
            println!("{:<30} {:<8} {:>8}  nbd: {u}", "", "", "");
        }
    }
    Ok(())
}
