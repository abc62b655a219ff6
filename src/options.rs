//! mount(8)-style options: `vdiskfs mount -o ro,allow_other,cache_size=64M`.
//!
//! mount(8) and `/etc/fstab` hand a filesystem helper one comma-separated
//! option string. Every `vdiskfs mount` flag has a `-o name[=value]`
//! spelling here (`--cache-size 64M` is `-o cache_size=64M`; a dash may be
//! written for the underscore). Options that only mean something to
//! mount(8) itself (`noauto`, `user`, `_netdev`, `nofail`, `x-*`,
//! `comment=*`, …) and the generic VFS flags (`nosuid`, `nodev`, `noexec`,
//! `noatime`, …) are accepted and dropped: a vdiskfs mount is always
//! `nosuid,nodev`, its files are executable only if `mode=` says so, and
//! access times are not tracked. Anything else is refused by name, unless
//! `--sloppy` (mount's `-s`) asks to ignore it.
//!
//! Within one option string the last occurrence of an option wins (as
//! mount(8) appends command-line options to the fstab ones). An option given
//! both as a flag and with `-o` must agree.
//!
//! mount(8) passes `rw` to helpers whenever `ro` is absent, so a plain `rw`
//! cannot tell an fstab line that asks for writing from one that forgot
//! `ro`. A plain `rw` therefore never writes into an image: the mount is
//! read-only, with a notice. Writing takes an explicit choice: `inplace`
//! (`--rw` on the command line), `overlay=FILE` or `snapshot`; mount(8)'s
//! own `rw` does not undo it. (Not `rw=inplace`: mount(8) keeps that one
//! for itself and passes a plain `rw`.)

use std::path::PathBuf;

use log::LevelFilter;

use crate::cli::{parse_size, MountArgs};
use crate::format::Format;

/// What the mount does with writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteMode {
    /// Read-only (the default of `vdiskfs mount`).
    Ro,
    /// Write into the top image in place (`--rw`, `-o inplace`).
    Rw,
    /// A plain `rw`, as mount(8) passes whenever `ro` is absent: read-only,
    /// with a notice saying how to ask for writes.
    PlainRw,
    /// Write into a qcow2 overlay file (`--overlay FILE`).
    Overlay(PathBuf),
    /// Write into a temporary overlay discarded at unmount (`--snapshot`).
    Snapshot,
}

/// One option as written, for error messages.
type Raw = String;

/// The parsed `-o` options; each field holds the value and how it was written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MountOptions {
    /// `ro`, `rw`, `overlay=FILE`, `snapshot`.
    pub write: Option<(WriteMode, Raw)>,
    /// `format=`.
    pub format: Option<(Format, Raw)>,
    /// `cache_size=`.
    pub cache_size: Option<(u64, Raw)>,
    /// `remote_chunk=` (remote images' chunk size).
    pub remote_chunk: Option<(u64, Raw)>,
    /// `remote_readahead=` (remote images' largest read-ahead window).
    pub remote_readahead: Option<(u64, Raw)>,
    /// `remote_cache=` (on-disk chunk cache directory).
    pub remote_cache: Option<(PathBuf, Raw)>,
    /// `remote_cache_size=` (its bound).
    pub remote_cache_size: Option<(u64, Raw)>,
    /// `aws_region=`.
    pub aws_region: Option<(String, Raw)>,
    /// `aws_endpoint=`.
    pub aws_endpoint: Option<(String, Raw)>,
    /// `aws_allow_http`.
    pub aws_allow_http: Option<Raw>,
    /// `aws_profile=`.
    pub aws_profile: Option<(String, Raw)>,
    /// `allow_other`.
    pub allow_other: Option<Raw>,
    /// `uid=` (number or user name).
    pub uid: Option<(u32, Raw)>,
    /// `gid=` (number or group name).
    pub gid: Option<(u32, Raw)>,
    /// `mode=` (octal).
    pub mode: Option<(u16, Raw)>,
    /// `single_link`.
    pub single_link: Option<Raw>,
    /// `untrusted`.
    pub untrusted: Option<Raw>,
    /// `allow_devices`.
    pub allow_devices: Option<Raw>,
    /// `ignore_cid`.
    pub ignore_cid: Option<Raw>,
    /// `max_depth=`.
    pub max_depth: Option<(usize, Raw)>,
    /// `threads=`.
    pub threads: Option<(usize, Raw)>,
    /// `transport=` (auto, uring, classic).
    pub transport: Option<(crate::fs::Transport, Raw)>,
    /// `log_file=`.
    pub log_file: Option<(PathBuf, Raw)>,
    /// `log_level=`.
    pub log_level: Option<(LevelFilter, Raw)>,
    /// `pid_file=`.
    pub pid_file: Option<(PathBuf, Raw)>,
    /// `partitions`.
    pub partitions: Option<Raw>,
    /// `unbuffered`.
    pub unbuffered: Option<Raw>,
    /// `force_lock`.
    pub force_lock: Option<Raw>,
    /// `no_passthrough`.
    pub no_passthrough: Option<Raw>,
    /// `nonempty`.
    pub nonempty: Option<Raw>,
    /// `nbd=ADDR` (repeatable: each adds a listener).
    pub nbd: Vec<(crate::nbd::server::Listen, Raw)>,
    /// Options accepted and dropped (mount(8)-only, VFS flags, or unknown with sloppy).
    pub dropped: Vec<Raw>,
}

/// Options that mean something to mount(8), or are generic VFS flags, and
/// that vdiskfs accepts and drops.
const DROPPED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "sync",
    "async",
    "dirsync",
    "symfollow",
    "nosymfollow",
    "iversion",
    "noiversion",
    "mand",
    "nomand",
    "silent",
    "loud",
];

/// Splits an option string at commas outside double quotes; quotes are
/// removed (`overlay="/a,b/o.qcow2"`). Empty items are skipped.
pub fn split(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(format!("unbalanced quote in mount options {s:?}"));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// Parses one `-o` string. With `sloppy`, unknown options are dropped
/// instead of refused.
pub fn parse(s: &str, sloppy: bool) -> Result<MountOptions, String> {
    let mut o = MountOptions::default();
    for item in split(s)? {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (item.as_str(), None),
        };
        if name.starts_with("x-") || name.starts_with("X-") || name == "comment" {
            o.dropped.push(item.clone());
            continue;
        }
        if DROPPED.contains(&name) {
            if value.is_some() {
                return Err(format!("mount option {name:?} takes no value"));
            }
            o.dropped.push(item.clone());
            continue;
        }
        let key = name.replace('-', "_");
        let raw = item.clone();
        let flag = |value: Option<&str>| match value {
            None => Ok(raw.clone()),
            Some(_) => Err(format!("mount option {name:?} takes no value")),
        };
        let val =
            || value.ok_or_else(|| format!("mount option {name:?} needs a value ({name}=...)"));
        let bad = |what: &str| format!("mount option {item:?}: {what}");
        match key.as_str() {
            "ro" => o.write = Some((WriteMode::Ro, flag(value)?)),
            "rw" => {
                let raw =
                    flag(value).map_err(|_| bad("takes no value (to write in place: inplace)"))?;
                // mount(8)'s own `rw` must not undo an explicit write mode.
                if matches!(
                    o.write,
                    None | Some((WriteMode::Ro | WriteMode::PlainRw, _))
                ) {
                    o.write = Some((WriteMode::PlainRw, raw));
                }
            }
            "inplace" => o.write = Some((WriteMode::Rw, flag(value)?)),
            "snapshot" => o.write = Some((WriteMode::Snapshot, flag(value)?)),
            "overlay" => {
                let v = val()?;
                if v.is_empty() {
                    return Err(bad("needs a file name"));
                }
                o.write = Some((WriteMode::Overlay(PathBuf::from(v)), raw.clone()));
            }
            "format" => {
                let f = Format::from_name(val()?).map_err(|e| bad(e.message()))?;
                o.format = Some((f, raw.clone()));
            }
            "cache_size" => {
                o.cache_size = Some((parse_cache_size(val()?).map_err(|e| bad(&e))?, raw.clone()))
            }
            "remote_chunk" => {
                o.remote_chunk = Some((parse_size(val()?).map_err(|e| bad(&e))?, raw.clone()))
            }
            "remote_readahead" => {
                o.remote_readahead = Some((parse_size(val()?).map_err(|e| bad(&e))?, raw.clone()))
            }
            "remote_cache" => {
                let v = val()?;
                if v.is_empty() {
                    return Err(bad("needs a directory"));
                }
                o.remote_cache = Some((PathBuf::from(v), raw.clone()));
            }
            "remote_cache_size" => {
                o.remote_cache_size = Some((parse_size(val()?).map_err(|e| bad(&e))?, raw.clone()))
            }
            "aws_region" | "aws_endpoint" | "aws_profile" => {
                let v = val()?;
                if v.is_empty() || v.contains('@') {
                    return Err(bad("needs a value (and no user@ in it)"));
                }
                let slot = match key.as_str() {
                    "aws_region" => &mut o.aws_region,
                    "aws_endpoint" => &mut o.aws_endpoint,
                    _ => &mut o.aws_profile,
                };
                *slot = Some((v.to_string(), raw.clone()));
            }
            "aws_allow_http" => o.aws_allow_http = Some(flag(value)?),
            "aws_access_key_id" | "aws_secret_access_key" | "aws_session_token" => {
                // The value is a secret: name the option only.
                return Err(format!(
                    "mount option {name:?}: credentials are not mount options (they would show \
                     in /proc/mounts and `vdiskfs list`); use aws_profile= or the AWS_* variables"
                ));
            }
            "allow_other" => o.allow_other = Some(flag(value)?),
            "uid" => o.uid = Some((lookup_id(val()?, false).map_err(|e| bad(&e))?, raw.clone())),
            "gid" => o.gid = Some((lookup_id(val()?, true).map_err(|e| bad(&e))?, raw.clone())),
            "mode" => o.mode = Some((parse_mode(val()?).map_err(|e| bad(&e))?, raw.clone())),
            "single_link" => o.single_link = Some(flag(value)?),
            "untrusted" => o.untrusted = Some(flag(value)?),
            "allow_devices" => o.allow_devices = Some(flag(value)?),
            "ignore_cid" => o.ignore_cid = Some(flag(value)?),
            "max_depth" => {
                o.max_depth = Some((parse_count(val()?).map_err(|e| bad(&e))?, raw.clone()))
            }
            "threads" => {
                let n = parse_threads(val()?).map_err(|e| bad(&e))?;
                o.threads = Some((n, raw.clone()));
            }
            "transport" => {
                let t = parse_transport(val()?).map_err(|e| bad(&e))?;
                o.transport = Some((t, raw.clone()));
            }
            "log_file" => {
                let v = val()?;
                if v.is_empty() {
                    return Err(bad("needs a file name"));
                }
                o.log_file = Some((PathBuf::from(v), raw.clone()));
            }
            "pid_file" => {
                let v = val()?;
                if v.is_empty() {
                    return Err(bad("needs a file name"));
                }
                o.pid_file = Some((PathBuf::from(v), raw.clone()));
            }
            "log_level" => {
                let l = parse_log_level(val()?).map_err(|e| bad(&e))?;
                o.log_level = Some((l, raw.clone()));
            }
            "partitions" => o.partitions = Some(flag(value)?),
            "unbuffered" => o.unbuffered = Some(flag(value)?),
            "force_lock" => o.force_lock = Some(flag(value)?),
            "no_passthrough" | "nopassthrough" => o.no_passthrough = Some(flag(value)?),
            "nonempty" => o.nonempty = Some(flag(value)?),
            "nbd" => {
                let l = crate::nbd::server::Listen::parse(val()?).map_err(|e| bad(&e))?;
                o.nbd.push((l, raw.clone()));
            }
            "remount" => return Err("remount is not supported: unmount and mount again".into()),
            "loop" => {
                return Err(
                    "mount option \"loop\" does not apply: vdiskfs exposes raw files; \
                     loop-mount those (mount -o loop MOUNTPOINT/disk.raw DIR)"
                        .into(),
                )
            }
            _ if sloppy => o.dropped.push(raw.clone()),
            _ => return Err(format!("unknown mount option {name:?}")),
        }
    }
    Ok(o)
}

// One parser per option, shared by the flag (`--threads 4`) and its `-o`
// spelling (`threads=4`), so both accept and refuse the same values with
// the same message.

/// `--mode`, `mode=`: octal permission bits.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| "bad mode (octal, e.g. 0640)".to_string())
}

/// Most FUSE workers: each holds 2 MiB of request buffers, and past the
/// disk's queue depth more workers only add threads (docs/performance.md).
pub const MAX_THREADS: usize = 256;

/// `--threads`, `threads=`: 1 to [`MAX_THREADS`].
pub fn parse_threads(s: &str) -> Result<usize, String> {
    match parse_count(s)? {
        0 => Err("needs at least 1".into()),
        n if n > MAX_THREADS => Err(format!("at most {MAX_THREADS} worker threads")),
        n => Ok(n),
    }
}

/// `--transport`, `transport=`: how requests travel between the kernel and
/// the daemon (docs/fuse-uring.md).
pub fn parse_transport(s: &str) -> Result<crate::fs::Transport, String> {
    use crate::fs::Transport;
    match s {
        "auto" => Ok(Transport::Auto),
        "uring" | "io_uring" => Ok(Transport::Uring),
        "classic" => Ok(Transport::Classic),
        _ => Err("auto, uring or classic".into()),
    }
}

/// Smallest `--cache-size`: room for a few metadata tables.
const MIN_CACHE: u64 = 1 << 20;

/// `--cache-size`, `cache_size=`: at least 1M, at most the machine's memory.
pub fn parse_cache_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n < MIN_CACHE {
        return Err("at least 1M (--unbuffered turns the cache off)".into());
    }
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        let mem = (pages as u64).saturating_mul(page as u64);
        if n > mem {
            return Err(format!(
                "more than this machine's memory ({} MiB)",
                mem >> 20
            ));
        }
    }
    Ok(n)
}

/// `--log-level`, `log_level=`.
pub fn parse_log_level(s: &str) -> Result<LevelFilter, String> {
    s.parse::<LevelFilter>().map_err(|_| {
        format!("unknown log level {s:?} (use off, error, warn, info, debug or trace)")
    })
}

/// `--uid`, `uid=`: a number or a user name.
pub fn parse_uid(s: &str) -> Result<u32, String> {
    lookup_id(s, false)
}

/// `--gid`, `gid=`: a number or a group name.
pub fn parse_gid(s: &str) -> Result<u32, String> {
    lookup_id(s, true)
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| "not a number".to_string())
}

/// A numeric id, or a user (group) name looked up in the system databases.
fn lookup_id(s: &str, group: bool) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    // The reentrant getpwnam_r/getgrnam_r, through nix.
    let found = if group {
        nix::unistd::Group::from_name(s).map(|g| g.map(|g| g.gid.as_raw()))
    } else {
        nix::unistd::User::from_name(s).map(|u| u.map(|u| u.uid.as_raw()))
    };
    match found {
        Ok(Some(id)) => return Ok(id),
        Ok(None) => {}
        Err(e) => return Err(format!("cannot look it up: {e}")),
    }
    Err(format!("no such {}", if group { "group" } else { "user" }))
}

/// Tells the user about an option that does something other than they may
/// expect. Goes to stderr, which is the user's terminal before detaching
/// (the logger is not set up yet while options are merged).
fn notice(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "vdiskfs: note: {msg}");
}

/// Merges `args.options` (every `-o`, in order) into `args`. `given(id)`
/// tells whether the flag with clap id `id` was given on the command line
/// (needed for the flags that have defaults). `--unbuffered` turns the
/// cache off, so it may not be combined with an explicit cache size.
pub fn merge(args: &mut MountArgs, given: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let o = parse(&args.options.join(","), args.sloppy)?;
    if !o.dropped.is_empty() {
        log::debug!("mount options ignored: {}", o.dropped.join(","));
    }
    let clash = |opt: &str, flag: &str| {
        Err(format!(
            "-o {opt} conflicts with {flag} given on the command line"
        ))
    };
    let cache_size_option = o.cache_size.is_some();
    // Write mode.
    let cli_mode = if args.read_only {
        Some(WriteMode::Ro)
    } else if args.rw {
        Some(WriteMode::Rw)
    } else if let Some(p) = &args.overlay {
        Some(WriteMode::Overlay(p.clone()))
    } else if args.snapshot {
        Some(WriteMode::Snapshot)
    } else {
        None
    };
    match (o.write, cli_mode) {
        (Some((WriteMode::PlainRw, _)), None) => notice(
            "\"rw\" (mount(8)'s default) does not write into the image: mounted read-only; \
             say -o inplace to write it in place, or overlay=FILE or snapshot \
             to keep it unchanged",
        ),
        // Any explicit write flag wins over mount(8)'s plain `rw`.
        (Some((WriteMode::PlainRw, _)), Some(_)) | (None, _) => {}
        (Some((m, raw)), Some(c)) if c != m => {
            let flag = match c {
                WriteMode::Rw => "--rw",
                WriteMode::Ro => "--read-only",
                WriteMode::Overlay(_) => "--overlay",
                _ => "--snapshot",
            };
            return clash(&raw, flag);
        }
        (Some(_), Some(_)) => {}
        (Some((m, _)), None) => match m {
            WriteMode::Ro | WriteMode::PlainRw => {}
            WriteMode::Rw => args.rw = true,
            WriteMode::Overlay(p) => args.overlay = Some(p),
            WriteMode::Snapshot => args.snapshot = true,
        },
    }
    macro_rules! opt_value {
        ($field:ident, $flag:literal) => {
            if let Some((v, raw)) = o.$field {
                match &args.$field {
                    Some(cur) if *cur != v => return clash(&raw, $flag),
                    _ => args.$field = Some(v),
                }
            }
        };
    }
    macro_rules! defaulted_value {
        ($field:ident, $flag:literal) => {
            if let Some((v, raw)) = o.$field {
                if given(stringify!($field)) && args.$field != v {
                    return clash(&raw, $flag);
                }
                args.$field = v;
            }
        };
    }
    macro_rules! switch {
        ($field:ident) => {
            if o.$field.is_some() {
                args.$field = true;
            }
        };
    }
    opt_value!(format, "--format");
    opt_value!(uid, "--uid");
    opt_value!(gid, "--gid");
    opt_value!(mode, "--mode");
    opt_value!(log_file, "--log-file");
    opt_value!(log_level, "--log-level");
    opt_value!(pid_file, "--pid-file");
    defaulted_value!(cache_size, "--cache-size");
    defaulted_value!(max_depth, "--max-depth");
    defaulted_value!(threads, "--threads");
    defaulted_value!(transport, "--transport");
    defaulted_value!(remote_chunk, "--remote-chunk");
    defaulted_value!(remote_readahead, "--remote-readahead");
    defaulted_value!(remote_cache_size, "--remote-cache-size");
    opt_value!(remote_cache, "--remote-cache");
    opt_value!(aws_region, "--aws-region");
    opt_value!(aws_endpoint, "--aws-endpoint");
    opt_value!(aws_profile, "--aws-profile");
    if !(64 << 10..=64 << 20).contains(&args.remote_chunk) {
        return Err("--remote-chunk must be between 64K and 64M".into());
    }
    switch!(allow_other);
    switch!(single_link);
    switch!(untrusted);
    switch!(allow_devices);
    switch!(ignore_cid);
    switch!(partitions);
    switch!(unbuffered);
    switch!(force_lock);
    switch!(no_passthrough);
    switch!(nonempty);
    switch!(aws_allow_http);
    for (l, _) in o.nbd {
        if !args.nbd.contains(&l) {
            args.nbd.push(l);
        }
    }
    if args.partitions && (args.rw || args.overlay.is_some() || args.snapshot) {
        // The kernel would cache a partition file and the whole disk
        // separately, so writes through one would not show in the other.
        return Err(
            "--partitions is read-only for now: it cannot be combined with \
                    --rw, --overlay or --snapshot"
                .into(),
        );
    }
    if args.unbuffered {
        if given("cache_size") || cache_size_option {
            return Err("--unbuffered turns the cache off; drop --cache-size (cache_size=)".into());
        }
        args.cache_size = 0;
        if args.rw {
            // O_DIRECT writes would need the same bounce buffering as reads.
            return Err("--unbuffered is for reading: it cannot be combined with --rw (rw)".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<MountOptions, String> {
        parse(s, false)
    }

    #[test]
    fn every_mount_flag_has_an_option_spelling() {
        let o = p(
            "ro,format=qcow2,cache_size=64M,allow_other,uid=1000,gid=0,mode=0444,\
                   single_link,untrusted,allow_devices,ignore_cid,max_depth=8,threads=3,\
                   log_file=/tmp/l,log_level=debug,partitions,unbuffered,force_lock,no_passthrough,\
                   remote_chunk=1M,remote_readahead=0",
        )
        .unwrap();
        assert_eq!(o.write.unwrap().0, WriteMode::Ro);
        assert_eq!(o.format.unwrap().0, Format::Qcow2);
        assert_eq!(o.cache_size.unwrap().0, 64 << 20);
        assert!(o.allow_other.is_some());
        assert_eq!(o.uid.unwrap().0, 1000);
        assert_eq!(o.gid.unwrap().0, 0);
        assert_eq!(o.mode.unwrap().0, 0o444);
        assert!(o.single_link.is_some() && o.untrusted.is_some());
        assert!(o.allow_devices.is_some() && o.ignore_cid.is_some());
        assert_eq!(o.max_depth.unwrap().0, 8);
        assert_eq!(o.threads.unwrap().0, 3);
        assert_eq!(o.log_file.unwrap().0, PathBuf::from("/tmp/l"));
        assert_eq!(o.log_level.unwrap().0, LevelFilter::Debug);
        assert!(o.partitions.is_some() && o.unbuffered.is_some());
        assert!(o.force_lock.is_some() && o.no_passthrough.is_some());
        assert_eq!(o.remote_chunk.unwrap().0, 1 << 20);
        assert_eq!(o.remote_readahead.unwrap().0, 0);
        assert!(o.dropped.is_empty());
    }

    #[test]
    fn remote_options_parse_and_credentials_are_refused_unechoed() {
        let o = parse(
            "remote_cache=/var/c,remote_cache_size=2G,aws_region=eu-1,\
             aws_endpoint=http://h:9000,aws_allow_http,aws_profile=p",
            false,
        )
        .unwrap();
        assert_eq!(o.remote_cache.unwrap().0, PathBuf::from("/var/c"));
        assert_eq!(o.remote_cache_size.unwrap().0, 2 << 30);
        assert_eq!(o.aws_region.unwrap().0, "eu-1");
        assert_eq!(o.aws_endpoint.unwrap().0, "http://h:9000");
        assert!(o.aws_allow_http.is_some());
        assert_eq!(o.aws_profile.unwrap().0, "p");
        for key in [
            "aws_access_key_id",
            "aws_secret_access_key",
            "aws_session_token",
        ] {
            let e = parse(&format!("{key}=TOPSECRET"), true).unwrap_err();
            assert!(
                e.contains("not mount options") && !e.contains("TOPSECRET"),
                "{e}"
            );
        }
        assert!(parse("aws_endpoint=http://u:p@h", false).is_err());
    }

    #[test]
    fn table() {
        // (options, Ok(write mode) or Err(substring of the error))
        let cases: &[(&str, Result<Option<WriteMode>, &str>)] = &[
            ("", Ok(None)),
            ("ro", Ok(Some(WriteMode::Ro))),
            ("rw", Ok(Some(WriteMode::PlainRw))),
            ("inplace", Ok(Some(WriteMode::Rw))),
            ("inplace,rw", Ok(Some(WriteMode::Rw))),
            ("rw,inplace,ro", Ok(Some(WriteMode::Ro))),
            (
                "overlay=/o.qcow2,rw",
                Ok(Some(WriteMode::Overlay("/o.qcow2".into()))),
            ),
            ("snapshot,rw", Ok(Some(WriteMode::Snapshot))),
            ("rw=yes", Err("inplace")),
            ("snapshot", Ok(Some(WriteMode::Snapshot))),
            (
                "overlay=/o.qcow2",
                Ok(Some(WriteMode::Overlay("/o.qcow2".into()))),
            ),
            (
                "overlay=\"/a,b.qcow2\"",
                Ok(Some(WriteMode::Overlay("/a,b.qcow2".into()))),
            ),
            ("rw,ro", Ok(Some(WriteMode::Ro))),
            ("ro,rw", Ok(Some(WriteMode::PlainRw))),
            (
                "defaults,ro,noauto,user,nouser,users,_netdev,nofail",
                Ok(Some(WriteMode::Ro)),
            ),
            (
                "ro,x-systemd.automount,x-foo=bar,X-mount.mkdir,comment=hi",
                Ok(Some(WriteMode::Ro)),
            ),
            (
                "ro,exec,noexec,suid,nosuid,dev,nodev,atime,noatime,relatime,sync,async",
                Ok(Some(WriteMode::Ro)),
            ),
            ("ro,,", Ok(Some(WriteMode::Ro))),
            ("cache-size=1G,single-link", Ok(None)),
            ("bogus", Err("unknown mount option \"bogus\"")),
            ("ro,frobnicate=3", Err("\"frobnicate\"")),
            ("ro=1", Err("takes no value")),
            ("noauto=1", Err("takes no value")),
            ("uid", Err("needs a value")),
            ("overlay=", Err("needs a file name")),
            ("format=xyz", Err("xyz")),
            ("cache_size=12X", Err("cache_size=12X")),
            ("mode=999", Err("bad mode")),
            ("threads=0", Err("at least 1")),
            ("max_depth=-1", Err("not a number")),
            ("log_level=loud", Err("log_level=loud")),
            ("uid=no-such-user-vdiskfs", Err("no such user")),
            ("gid=no-such-group-vdiskfs", Err("no such group")),
            ("remount,ro", Err("remount is not supported")),
            ("loop", Err("loop")),
            ("overlay=\"/a", Err("unbalanced quote")),
        ];
        for (s, want) in cases {
            let got = p(s);
            match (want, got) {
                (Ok(w), Ok(o)) => assert_eq!(o.write.map(|x| x.0), *w, "{s}"),
                (Err(needle), Err(e)) => assert!(e.contains(needle), "{s}: {e}"),
                (w, g) => panic!("{s}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn user_and_group_names_resolve() {
        assert_eq!(p("uid=root,gid=root").unwrap().uid.unwrap().0, 0);
    }

    #[test]
    fn sloppy_drops_unknown_options() {
        let o = parse("ro,bogus,other=1", true).unwrap();
        assert_eq!(o.dropped, ["bogus", "other=1"]);
        // Malformed known options are still errors.
        assert!(parse("uid", true).is_err());
    }

    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(flatten)]
        m: MountArgs,
    }

    /// Parses a mount command line and merges its -o like `vdiskfs` does.
    fn merged(argv: &[&str]) -> Result<MountArgs, String> {
        use clap::{CommandFactory, FromArgMatches};
        let mut full = vec!["t"];
        full.extend_from_slice(argv);
        full.extend_from_slice(&["img", "mp"]);
        let matches = T::command()
            .try_get_matches_from(full)
            .map_err(|e| e.to_string())?;
        let mut t = T::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        let given =
            |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        merge(&mut t.m, &given)?;
        Ok(t.m)
    }

    #[test]
    fn options_merge_into_the_flags() {
        let m = merged(&[
            "-o",
            "allow_other,uid=7",
            "-o",
            "cache_size=1M,max_depth=3,threads=2",
        ])
        .unwrap();
        assert!(m.allow_other);
        assert_eq!(m.uid, Some(7));
        assert_eq!(m.cache_size, 1 << 20);
        assert_eq!(m.max_depth, 3);
        assert_eq!(m.threads, 2);
        assert!(!m.rw);
        let m = merged(&["-o", "rw"]).unwrap();
        assert!(!m.rw, "mount(8)'s plain rw must not write in place");
        let m = merged(&["-o", "inplace"]).unwrap();
        assert!(m.rw);
        let m = merged(&["--snapshot", "-o", "rw"]).unwrap();
        assert!(m.snapshot && !m.rw);
        let m = merged(&["-o", "overlay=/x.qcow2"]).unwrap();
        assert_eq!(m.overlay, Some(PathBuf::from("/x.qcow2")));
        let m = merged(&["-o", "snapshot"]).unwrap();
        assert!(m.snapshot);
        let m = merged(&["-o", "ro,partitions"]).unwrap();
        assert!(m.partitions);
        let m = merged(&["-o", "unbuffered"]).unwrap();
        assert!(m.unbuffered);
        assert_eq!(m.cache_size, 0);
    }

    #[test]
    fn an_option_given_both_ways_must_agree() {
        assert!(merged(&["--uid", "7", "-o", "uid=7"]).is_ok());
        assert!(merged(&["--single-link", "-o", "single_link"]).is_ok());
        assert!(merged(&["--cache-size", "1M", "-o", "cache_size=1024K"]).is_ok());
        assert!(merged(&["--rw", "-o", "rw"]).is_ok());
        let cases: &[(&[&str], &str)] = &[
            (&["--uid", "7", "-o", "uid=8"], "--uid"),
            (&["--format", "raw", "-o", "format=qcow2"], "--format"),
            (
                &["--cache-size", "1M", "-o", "cache_size=2M"],
                "--cache-size",
            ),
            (
                &["--cache-size", "256M", "-o", "cache_size=2M"],
                "--cache-size",
            ),
            (&["--threads", "4", "-o", "threads=5"], "--threads"),
            (&["--max-depth", "4", "-o", "max_depth=5"], "--max-depth"),
            (&["--mode", "0444", "-o", "mode=0400"], "--mode"),
            (
                &["--log-level", "info", "-o", "log_level=debug"],
                "--log-level",
            ),
            (&["--rw", "-o", "ro"], "--rw"),
            (&["--snapshot", "-o", "inplace"], "--snapshot"),
            (&["-r", "-o", "inplace"], "--read-only"),
            (&["--overlay", "/a", "-o", "overlay=/b"], "--overlay"),
            (&["--unbuffered", "-o", "cache_size=1M"], "unbuffered"),
            (&["--cache-size", "1M", "-o", "unbuffered"], "unbuffered"),
            (&["--rw", "-o", "unbuffered"], "--rw"),
            (&["--snapshot", "-o", "partitions"], "--partitions"),
            (&["-o", "ro,nonsense"], "nonsense"),
        ];
        for (argv, needle) in cases {
            let e = merged(argv).unwrap_err();
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
    }

    #[test]
    fn sloppy_flag_applies_to_merging() {
        assert!(merged(&["--sloppy", "-o", "ro,whatever"]).is_ok());
    }
}
