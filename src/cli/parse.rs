//! One parser per value of the command line, and the limits that go with
//! it. Each is used for both spellings of an option — the flag
//! (`--threads 4`, through clap's `value_parser`) and its mount(8) `-o`
//! form (`threads=4`, through [`super::options`]) — so the two accept and
//! refuse the same values with the same message. The errors are the
//! crate's [`Error`] ([`ErrorKind::InvalidInput`](crate::ErrorKind)); clap
//! or the `-o` parser adds which argument was wrong.

use crate::format::qcow2::snapshot::SnapshotSel;
use crate::logging::{Filters, LogSpec};

use crate::error::{Error, Result};
use crate::format::Format;
use crate::fs::Transport;
use crate::nbd::server::Listen;

/// Most FUSE workers: each holds 2 MiB of request buffers, and past the
/// disk's queue depth more workers only add threads (docs/performance.md).
pub const MAX_THREADS: usize = 256;

/// Smallest `--cache-size`: room for a few metadata tables.
pub const MIN_CACHE: u64 = 1 << 20;

/// Bounds of `--remote-chunk`: below 64K a GET costs more than it brings,
/// above 64M one cold read fetches too much.
pub const REMOTE_CHUNK: std::ops::RangeInclusive<u64> = 64 << 10..=64 << 20;

/// `--cache-size` when neither spelling gives one.
pub const DEFAULT_CACHE: u64 = 256 << 20;
/// `--remote-chunk` when neither spelling gives one.
pub const DEFAULT_REMOTE_CHUNK: u64 = 4 << 20;
/// `--remote-readahead` when neither spelling gives one.
pub const DEFAULT_REMOTE_READAHEAD: u64 = 64 << 20;
/// `--remote-cache-size` when neither spelling gives one.
pub const DEFAULT_REMOTE_CACHE_SIZE: u64 = 1 << 30;

/// FUSE workers when neither spelling says: a worker blocks in the host
/// `pread` of a cold read, so the disk sees at most this many reads at
/// once. 32 keeps a QD32 client's queue on the device (random 4 KiB reads
/// of a cold 4 GiB qcow2 on 2 cores: 34k IOPS with 8 workers, 41–47k with
/// 32, no gain at 64; see docs/performance.md) and bounds the per-worker
/// read buffers to 32 MiB.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() * 16).clamp(16, 32))
        .unwrap_or(32)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// Sizes such as `512`, `64K`, `256M`, `1.5G`, `1GiB` (binary units; a
/// fraction is rounded down to whole bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let malformed = || bad(format!("bad size {s:?} (e.g. 512M, 1.5G)"));
    let dangling = num.ends_with('.');
    if int.is_empty() || dangling || frac.contains('.') || frac.len() > 9 {
        return Err(malformed());
    }
    let n: u64 = int.parse().map_err(|_| malformed())?;
    let f: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| malformed())?
    };
    let mult: u64 = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad(format!("bad size unit in {s:?} (use K, M, G or T)"))),
    };
    // 10^9 * 2^40 fits in a u128 many times over: no overflow in the fraction.
    let frac_bytes = u128::from(f) * u128::from(mult) / 10u128.pow(frac.len() as u32);
    n.checked_mul(mult)
        .and_then(|b| b.checked_add(u64::try_from(frac_bytes).ok()?))
        .ok_or_else(|| bad(format!("size {s:?} is too large")))
}

/// `--cache-size`, `cache_size=`: at least [`MIN_CACHE`], at most the
/// machine's memory.
pub fn parse_cache_size(s: &str) -> Result<u64> {
    let n = parse_size(s)?;
    if n < MIN_CACHE {
        return Err(bad("at least 1M (--unbuffered turns the cache off)"));
    }
    use nix::unistd::{sysconf, SysconfVar};
    let var = |v| sysconf(v).ok().flatten().unwrap_or(0);
    let (pages, page) = (var(SysconfVar::_PHYS_PAGES), var(SysconfVar::PAGE_SIZE));
    if pages > 0 && page > 0 {
        let mem = (pages as u64).saturating_mul(page as u64);
        if n > mem {
            return Err(bad(format!(
                "more than this machine's memory ({} MiB)",
                mem >> 20
            )));
        }
    }
    Ok(n)
}

/// `--remote-chunk`, `remote_chunk=`: a size within [`REMOTE_CHUNK`].
pub fn parse_remote_chunk(s: &str) -> Result<u64> {
    let n = parse_size(s)?;
    if !REMOTE_CHUNK.contains(&n) {
        return Err(bad("between 64K and 64M"));
    }
    Ok(n)
}

/// A count (`--max-depth`, `max_depth=`).
pub fn parse_count(s: &str) -> Result<usize> {
    s.parse().map_err(|_| bad("not a number"))
}

/// `--threads`, `threads=`: 1 to [`MAX_THREADS`].
pub fn parse_threads(s: &str) -> Result<usize> {
    match parse_count(s)? {
        0 => Err(bad("needs at least 1")),
        n if n > MAX_THREADS => Err(bad(format!("at most {MAX_THREADS} worker threads"))),
        n => Ok(n),
    }
}

/// `--transport`, `transport=`, `$VDISKFS_TRANSPORT`: how requests travel
/// between the kernel and the daemon (docs/fuse-uring.md).
pub fn parse_transport(s: &str) -> Result<Transport> {
    match s {
        "auto" => Ok(Transport::Auto),
        "uring" | "io_uring" => Ok(Transport::Uring),
        "classic" => Ok(Transport::Classic),
        _ => Err(bad("auto, uring or classic")),
    }
}

/// `--log-level`, `log_level=`: a level name or libvirt log outputs
/// (see [`crate::logging`]).
pub fn parse_log_level(s: &str) -> Result<LogSpec> {
    LogSpec::parse(s).map_err(bad)
}

/// `--log-filters`, `log_filters=`: libvirt log filters.
pub fn parse_log_filters(s: &str) -> Result<Filters> {
    crate::logging::parse_filters(s).map_err(bad)
}

/// `--load-snapshot`, `load_snapshot=`: an internal qcow2 snapshot's ID or
/// name, or `snapshot.id=`/`snapshot.name=`.
pub fn parse_snapshot(s: &str) -> Result<SnapshotSel> {
    SnapshotSel::parse(s).map_err(bad)
}

/// `--format`, `format=`: a format name.
pub fn parse_format(s: &str) -> Result<Format> {
    // Rebuilt from the message: the format error carries no path here.
    Format::from_name(s).map_err(|e| bad(e.message()))
}

/// `--mode`, `mode=`: the exposed files' permission bits, in octal.
pub fn parse_file_mode(s: &str) -> Result<u16> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| bad("bad mode (octal, e.g. 0640)"))
}

/// `--uid`, `uid=`: a number or a user name.
pub fn parse_uid(s: &str) -> Result<u32> {
    lookup_id(s, false)
}

/// `--gid`, `gid=`: a number or a group name.
pub fn parse_gid(s: &str) -> Result<u32> {
    lookup_id(s, true)
}

/// `--nbd`, `nbd=`: a listener address.
pub fn parse_listen(s: &str) -> Result<Listen> {
    Listen::parse(s).map_err(bad)
}

/// A value that names something else (`--aws-region`, `aws_profile=`…):
/// not empty, and no `user@` in it (it would show in /proc/mounts).
pub fn parse_name(s: &str) -> Result<String> {
    if s.is_empty() || s.contains('@') {
        return Err(bad("needs a value (and no user@ in it)"));
    }
    Ok(s.to_string())
}

/// A file or directory name (`--overlay`, `log_file=`…): not empty.
pub fn parse_path(s: &str) -> Result<std::path::PathBuf> {
    if s.is_empty() {
        return Err(bad("needs a file name"));
    }
    Ok(s.into())
}

/// A numeric id, or a user (group) name looked up in the system databases.
fn lookup_id(s: &str, group: bool) -> Result<u32> {
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
        Err(e) => return Err(bad(format!("cannot look it up: {e}"))),
    }
    Err(bad(format!(
        "no such {}",
        if group { "group" } else { "user" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        assert!(msg(parse_size("12X")).contains("bad size unit"));
        assert!(msg(parse_size("99999999999T")).contains("too large"));
        for bad in ["1.", ".5G", "1.2.3M", "G", "", "-1M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_have_messages() {
        assert!(msg(parse_cache_size("0")).contains("at least 1M"));
        assert!(msg(parse_cache_size("1023K")).contains("at least 1M"));
        assert_eq!(parse_cache_size("1M").unwrap(), MIN_CACHE);
        assert!(msg(parse_cache_size("10000T")).contains("machine's memory"));
        assert!(msg(parse_threads("0")).contains("at least 1"));
        assert_eq!(parse_threads("256").unwrap(), MAX_THREADS);
        assert!(msg(parse_threads("257")).contains("at most 256"));
        assert!(msg(parse_threads("x")).contains("not a number"));
        assert!(msg(parse_remote_chunk("32K")).contains("between 64K and 64M"));
        assert!(msg(parse_remote_chunk("65M")).contains("between 64K and 64M"));
        assert_eq!(parse_remote_chunk("64K").unwrap(), 64 << 10);
        assert_eq!(parse_remote_chunk("64M").unwrap(), 64 << 20);
    }

    #[test]
    fn values_parse() {
        assert_eq!(parse_file_mode("0640").unwrap(), 0o640);
        assert_eq!(parse_file_mode("0o444").unwrap(), 0o444);
        assert!(msg(parse_file_mode("999")).contains("bad mode"));
        assert!(parse_file_mode("17777").is_err());
        assert_eq!(parse_transport("io_uring").unwrap(), Transport::Uring);
        assert!(msg(parse_transport("fast")).contains("auto, uring or classic"));
        assert_eq!(
            parse_log_level("debug").unwrap(),
            LogSpec::Level(log::LevelFilter::Debug)
        );
        assert!(msg(parse_log_level("chatty")).contains("unknown log level \"chatty\""));
        assert_eq!(parse_format("qcow2").unwrap(), Format::Qcow2);
        assert!(parse_format("xyz").is_err());
        assert_eq!(parse_uid("root").unwrap(), 0);
        assert_eq!(parse_uid("1000").unwrap(), 1000);
        assert_eq!(parse_gid("root").unwrap(), 0);
        assert!(msg(parse_uid("no-such-user-vdiskfs")).contains("no such user"));
        assert!(msg(parse_gid("no-such-group-vdiskfs")).contains("no such group"));
        assert!(parse_name("a@b").is_err() && parse_name("").is_err());
        assert!(msg(parse_path("")).contains("needs a file name"));
    }
}
