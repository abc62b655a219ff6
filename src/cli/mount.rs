//! `vdiskfs mount`: opens the disks a [`MountConfig`] names, detaches (the
//! daemon re-executes the same command line), mounts them over FUSE (and
//! NBD with `--nbd`), and serves until unmounted.

use std::sync::Arc;

use log::info;

use super::config::MountConfig;
use super::mountpoint::{self, MountPlan};
use crate::cache::Caches;
use crate::chain::Chain;
use crate::daemon::{self, MountState, Notifier, StateFile};
use crate::error::{Error, Result};
use crate::fs::{Access, Disk, VdiskFs};
use crate::overlay;

/// Memory each FUSE worker may hold beyond the caches: its request buffer
/// and its read-reply buffer, one full request each.
const WORKER_BUFFERS: u64 = 2 * crate::fs::MAX_REQUEST as u64;

/// The caches' share of `--cache-size`: what the workers' buffers leave,
/// and at least half, so that the daemon stays within the cache size plus
/// a fixed margin whatever the number of workers.
fn cache_budget(cache_size: u64, threads: usize) -> usize {
    let workers = WORKER_BUFFERS.saturating_mul(threads as u64);
    let bytes = cache_size - workers.min(cache_size / 2);
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

fn open_disks(cfg: &MountConfig, plan: &MountPlan) -> Result<Vec<Disk>> {
    let disk = &cfg.disk;
    let budget = cache_budget(disk.cache_size, cfg.threads);
    let images = plan.images.iter().map(|(p, _)| p.as_path());
    let budget = disk.chain.remote.apply(budget, images)?;
    let caches: Arc<Caches> = Caches::new(budget);
    let opts = disk.chain_options();
    let mut disks = Vec::new();
    for (path, name) in &plan.images {
        let chain = overlay::open(path, &disk.mode, &opts, &caches, disk.force_lock)?;
        let xattrs = disk_xattrs(&chain);
        let chain = Arc::new(chain);
        let parts = if cfg.partitions {
            crate::fs::partitions::partition_disks(name, &chain, &xattrs)?
        } else {
            Vec::new()
        };
        disks.push(Disk::new(name.clone(), chain, xattrs));
        disks.extend(parts);
    }
    crate::fs::partitions::check_unique_names(&disks)?;
    Ok(disks)
}

/// `user.vdiskfs.*` attributes describing a disk.
fn disk_xattrs(chain: &Chain) -> Vec<(String, Vec<u8>)> {
    let top = &chain.layers()[0];
    let li = top.info();
    let mut x = vec![
        (
            "user.vdiskfs.format".to_string(),
            li.format.name().as_bytes().to_vec(),
        ),
        (
            "user.vdiskfs.virtual_size".to_string(),
            chain.size().to_string().into_bytes(),
        ),
        (
            "user.vdiskfs.chain".to_string(),
            chain
                .layers()
                .iter()
                .map(|l| format!("{}:{}", l.format(), l.path().display()))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes(),
        ),
    ];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (k, v) in &li.details {
        match v {
            // One attribute per member (`user.vdiskfs.geometry.heads`); the
            // VMDK ddb map's keys already start with `ddb.`.
            serde_json::Value::Object(m) => {
                for (sub, sv) in m {
                    let name = if sub.starts_with(&format!("{k}.")) {
                        format!("user.vdiskfs.{sub}")
                    } else {
                        format!("user.vdiskfs.{k}.{sub}")
                    };
                    x.push((name, text(sv).into_bytes()));
                }
            }
            other => x.push((format!("user.vdiskfs.{k}"), text(other).into_bytes())),
        }
    }
    x
}

/// Runs `vdiskfs mount`: detaches unless `--foreground` (or this is the
/// detached daemon), then serves until unmounted.
pub fn run(cfg: MountConfig) -> Result<()> {
    let plan = mountpoint::plan(&cfg)?;
    if !cfg.foreground {
        // Validate everything we can before detaching, so errors reach the user.
        if let Some(p) = &cfg.disk.log_file {
            // Opened (created) here too: the daemon has no terminal to say it cannot.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io("cannot open the log file", e).with_path(p))?;
        }
        if let Some(crate::logging::LogSpec::Outputs(outputs)) = &cfg.log_level {
            // The same for a file output of --log-level.
            for o in outputs {
                if let crate::logging::Sink::File(p) = &o.sink {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| Error::io("cannot open the log file", e).with_path(p))?;
                }
            }
        }
        drop(open_disks(&cfg, &plan)?);
        return daemon::spawn_detached(&[]);
    }
    let mut notifier = Notifier::new(cfg.notify_fd);
    let result = serve(&cfg, &plan, &mut notifier);
    if let Err(e) = &result {
        notifier.failed(e);
    }
    result
}

fn serve(cfg: &MountConfig, plan: &MountPlan, notifier: &mut Notifier) -> Result<()> {
    // Before any thread starts (the write queue's flusher, the remote
    // runtime, the NBD server), so that they all inherit the mask and the
    // signals reach only the signal thread.
    let sigset = daemon::block_signals();
    let disks = open_disks(cfg, plan)?;
    if cfg.notify_fd.is_some() {
        // Detached: every path is open or absolute by now (the log file's
        // too), so stop pinning the caller's working directory's filesystem.
        let _ = std::env::set_current_dir("/");
    }
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let access = Access {
        uid: cfg.uid.unwrap_or(uid),
        gid: cfg.gid.unwrap_or(gid),
        mode: cfg.file_mode.unwrap_or(if cfg.disk.mode.writable() {
            0o600
        } else {
            0o400
        }),
    };
    let fsname = plan
        .images
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut fs = VdiskFs::new(disks, plan.single_file, access);
    if cfg.no_passthrough {
        fs = fs.without_passthrough();
    }
    let fs = std::sync::Arc::new(fs);
    let nbd = crate::nbd::cmd::serve_mount(&cfg.nbd, &cfg.nbd_net, &fs, &plan.images)?;
    // Before mounting: a failure here must not leave a mount behind.
    let _pid_file = match &cfg.pid_file {
        Some(p) => Some(daemon::PidFile::create(p)?),
        None => None,
    };
    let mut session = crate::fs::mount(
        fs,
        &plan.mountpoint,
        &crate::fs::MountConfig {
            fsname,
            read_only: !cfg.disk.mode.writable(),
            allow_other: cfg.allow_other,
            threads: cfg.threads,
            transport: cfg.transport,
        },
    )
    .map_err(|e| Error::io("cannot mount", e).with_path(&plan.mountpoint))?;
    let _state = StateFile::create(&MountState {
        mountpoint: plan.mountpoint.clone(),
        images: plan.images.iter().map(|(p, _)| p.clone()).collect(),
        mode: cfg.disk.mode.name().into(),
        pid: std::process::id(),
        transport: Some(session.transport.name().into()),
        nbd: nbd.as_ref().map_or(Vec::new(), |s| s.endpoints().to_vec()),
    })
    .map_err(|e| log::warn!("{e}; vdiskfs list will not show this mount"))
    .ok();
    let mut unmounter = session.unmounter();
    daemon::on_signal(sigset, move || {
        if let Err(e) = unmounter.unmount() {
            log::error!("unmount on signal failed: {e}");
        }
    });
    info!("mounted on {}", plan.mountpoint.display());
    notifier.ready();
    let ran = session
        .run()
        .map_err(|e| Error::io("FUSE session failed", e).with_path(&plan.mountpoint));
    if let Some(server) = nbd {
        // Unmounted: NBD clients finish their in-flight requests and go.
        server.stopper().stop();
        server.wait();
    }
    ran?;
    info!("unmounted {}", plan.mountpoint.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_buffers_come_out_of_the_cache_size_up_to_half() {
        const M: u64 = 1 << 20;
        assert_eq!(cache_budget(256 * M, 32), (256 - 64) as usize * M as usize);
        assert_eq!(cache_budget(256 * M, 8), (256 - 16) as usize * M as usize);
        assert_eq!(cache_budget(64 * M, 32), 32 * M as usize);
        assert_eq!(cache_budget(0, 32), 0);
    }
}
