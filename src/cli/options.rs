//! mount(8)-style options, `vdiskfs mount -o ro,allow_other,cache_size=64M`,
//! parsed into their raw form ([`MountOptions`]); [`super::config`]
//! checks them against the flags and validates both at once.
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

use super::parse;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::fs::Transport;
use crate::nbd::server::Listen;
use crate::overlay::WriteMode;

/// One option as written, for error messages.
pub type Raw = String;

/// The parsed `-o` options; each field holds the value and how it was
/// written. Nothing here is checked against the flags yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MountOptions {
    /// `ro`, `inplace`, `overlay=FILE`, `snapshot` (the last one wins).
    pub write: Option<(WriteMode, Raw)>,
    /// mount(8)'s plain `rw` (given after any `ro`): read-only, with a
    /// notice saying how to ask for writes.
    pub plain_rw: Option<Raw>,
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
    pub transport: Option<(Transport, Raw)>,
    /// `log_file=`.
    pub log_file: Option<(PathBuf, Raw)>,
    /// `log_level=`.
    pub log_level: Option<(crate::logging::LogSpec, Raw)>,
    /// `log_filters=` (libvirt's log_filters).
    pub log_filters: Option<(crate::logging::Filters, Raw)>,
    /// `load_snapshot=` (an ID or name; the `snapshot.id=` form needs the flag:
    /// mount(8) splits options at commas).
    pub load_snapshot: Option<(crate::format::qcow2::snapshot::SnapshotSel, Raw)>,
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
    pub nbd: Vec<(Listen, Raw)>,
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
pub fn split(s: &str) -> Result<Vec<String>> {
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
        return Err(Error::invalid(format!(
            "unbalanced quote in mount options {s:?}"
        )));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// Parses one `-o` string. With `sloppy`, unknown options are dropped
/// instead of refused. Each value goes through the same parser as its flag
/// ([`super::parse`]); its error is prefixed with the option as written.
pub fn parse(s: &str, sloppy: bool) -> Result<MountOptions> {
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
        let no_value = || Error::invalid(format!("mount option {name:?} takes no value"));
        if DROPPED.contains(&name) {
            if value.is_some() {
                return Err(no_value());
            }
            o.dropped.push(item.clone());
            continue;
        }
        let key = name.replace('-', "_");
        let raw = item.clone();
        // A switch: present, without a value.
        let flag = || match value {
            None => Ok(raw.clone()),
            Some(_) => Err(no_value()),
        };
        // A value, through the flag's own parser.
        macro_rules! val {
            ($parser:expr) => {{
                let v = value.ok_or_else(|| {
                    Error::invalid(format!("mount option {name:?} needs a value ({name}=...)"))
                })?;
                let parsed = $parser(v).map_err(|e: Error| {
                    Error::invalid(format!("mount option {item:?}: {}", e.message()))
                })?;
                Some((parsed, raw.clone()))
            }};
        }
        match key.as_str() {
            "ro" => {
                o.write = Some((WriteMode::ReadOnly, flag()?));
                o.plain_rw = None;
            }
            "rw" => {
                let raw = flag().map_err(|_| {
                    Error::invalid(format!(
                        "mount option {item:?}: takes no value (to write in place: inplace)"
                    ))
                })?;
                // mount(8)'s own `rw` must not undo an explicit write mode.
                if matches!(o.write, None | Some((WriteMode::ReadOnly, _))) {
                    o.write = None;
                    o.plain_rw = Some(raw);
                }
            }
            "inplace" | "snapshot" | "overlay" => {
                o.write = match key.as_str() {
                    "inplace" => Some((WriteMode::InPlace, flag()?)),
                    "snapshot" => Some((WriteMode::Snapshot, flag()?)),
                    _ => val!(parse::parse_path).map(|(p, r)| (WriteMode::Overlay(p), r)),
                };
                o.plain_rw = None;
            }
            "format" => o.format = val!(parse::parse_format),
            "cache_size" => o.cache_size = val!(parse::parse_cache_size),
            "remote_chunk" => o.remote_chunk = val!(parse::parse_remote_chunk),
            "remote_readahead" => o.remote_readahead = val!(parse::parse_size),
            "remote_cache" => o.remote_cache = val!(parse::parse_path),
            "remote_cache_size" => o.remote_cache_size = val!(parse::parse_size),
            "aws_region" => o.aws_region = val!(parse::parse_name),
            "aws_endpoint" => o.aws_endpoint = val!(parse::parse_name),
            "aws_profile" => o.aws_profile = val!(parse::parse_name),
            "aws_allow_http" => o.aws_allow_http = Some(flag()?),
            "aws_access_key_id" | "aws_secret_access_key" | "aws_session_token" => {
                // The value is a secret: name the option only.
                return Err(Error::invalid(format!(
                    "mount option {name:?}: credentials are not mount options (they would show \
                     in /proc/mounts and `vdiskfs list`); use aws_profile= or the AWS_* variables"
                )));
            }
            "allow_other" => o.allow_other = Some(flag()?),
            "uid" => o.uid = val!(parse::parse_uid),
            "gid" => o.gid = val!(parse::parse_gid),
            "mode" => o.mode = val!(parse::parse_file_mode),
            "single_link" => o.single_link = Some(flag()?),
            "untrusted" => o.untrusted = Some(flag()?),
            "allow_devices" => o.allow_devices = Some(flag()?),
            "ignore_cid" => o.ignore_cid = Some(flag()?),
            "max_depth" => o.max_depth = val!(parse::parse_count),
            "threads" => o.threads = val!(parse::parse_threads),
            "transport" => o.transport = val!(parse::parse_transport),
            "log_file" => o.log_file = val!(parse::parse_path),
            "pid_file" => o.pid_file = val!(parse::parse_path),
            "log_level" => o.log_level = val!(parse::parse_log_level),
            "log_filters" => o.log_filters = val!(parse::parse_log_filters),
            "load_snapshot" => o.load_snapshot = val!(parse::parse_snapshot),
            "partitions" => o.partitions = Some(flag()?),
            "unbuffered" => o.unbuffered = Some(flag()?),
            "force_lock" => o.force_lock = Some(flag()?),
            "no_passthrough" | "nopassthrough" => o.no_passthrough = Some(flag()?),
            "nonempty" => o.nonempty = Some(flag()?),
            "nbd" => o.nbd.extend(val!(parse::parse_listen)),
            "remount" => {
                return Err(Error::invalid(
                    "remount is not supported: unmount and mount again",
                ))
            }
            "loop" => {
                return Err(Error::invalid(
                    "mount option \"loop\" does not apply: vdiskfs exposes raw files; \
                     loop-mount those (mount -o loop MOUNTPOINT/disk.raw DIR)",
                ))
            }
            _ if sloppy => o.dropped.push(raw.clone()),
            _ => return Err(Error::invalid(format!("unknown mount option {name:?}"))),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> std::result::Result<MountOptions, String> {
        parse(s, false).map_err(|e| e.to_string())
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
        assert_eq!(o.write.unwrap().0, WriteMode::ReadOnly);
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
        assert_eq!(
            o.log_level.unwrap().0,
            crate::logging::LogSpec::Level(log::LevelFilter::Debug)
        );
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
            let e = parse(&format!("{key}=TOPSECRET"), true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("not mount options") && !e.contains("TOPSECRET"),
                "{e}"
            );
        }
        assert!(parse("aws_endpoint=http://u:p@h", false).is_err());
    }

    #[test]
    fn table() {
        // (options, Ok(write mode) or Err(substring of the error)); `plain`
        // stands for mount(8)'s plain `rw`.
        let plain = Some(WriteMode::Overlay("(plain rw)".into()));
        let cases: &[(&str, std::result::Result<Option<WriteMode>, &str>)] = &[
            ("", Ok(None)),
            ("ro", Ok(Some(WriteMode::ReadOnly))),
            ("rw", Ok(plain.clone())),
            ("inplace", Ok(Some(WriteMode::InPlace))),
            ("inplace,rw", Ok(Some(WriteMode::InPlace))),
            ("rw,inplace,ro", Ok(Some(WriteMode::ReadOnly))),
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
            ("rw,ro", Ok(Some(WriteMode::ReadOnly))),
            ("ro,rw", Ok(plain.clone())),
            (
                "defaults,ro,noauto,user,nouser,users,_netdev,nofail",
                Ok(Some(WriteMode::ReadOnly)),
            ),
            (
                "ro,x-systemd.automount,x-foo=bar,X-mount.mkdir,comment=hi",
                Ok(Some(WriteMode::ReadOnly)),
            ),
            (
                "ro,exec,noexec,suid,nosuid,dev,nodev,atime,noatime,relatime,sync,async",
                Ok(Some(WriteMode::ReadOnly)),
            ),
            ("ro,,", Ok(Some(WriteMode::ReadOnly))),
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
                (Ok(w), Ok(o)) => {
                    let got = match (o.write, o.plain_rw) {
                        (None, Some(_)) => plain.clone(),
                        (w, None) => w.map(|x| x.0),
                        (Some(_), Some(_)) => panic!("{s}: both a write mode and plain rw"),
                    };
                    assert_eq!(got, *w, "{s}");
                }
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

    #[test]
    fn an_option_and_its_flag_share_the_parser_and_its_message() {
        // (option, the flag's parser on the same value)
        type Parser = fn(&str) -> Result<()>;
        let cases: &[(&str, Parser)] = &[
            ("uid=no-such-user-vdiskfs", |v| {
                parse::parse_uid(v).map(drop)
            }),
            ("threads=0", |v| parse::parse_threads(v).map(drop)),
            ("threads=100000", |v| parse::parse_threads(v).map(drop)),
            ("cache_size=0", |v| parse::parse_cache_size(v).map(drop)),
            ("cache_size=1.5X", |v| parse::parse_cache_size(v).map(drop)),
            ("log_level=chatty", |v| parse::parse_log_level(v).map(drop)),
            ("transport=fast", |v| parse::parse_transport(v).map(drop)),
            ("remote_chunk=1K", |v| {
                parse::parse_remote_chunk(v).map(drop)
            }),
            ("mode=8", |v| parse::parse_file_mode(v).map(drop)),
        ];
        for (opt, flag) in cases {
            let (_, value) = opt.split_once('=').unwrap();
            let from_flag = flag(value).unwrap_err();
            let from_option = p(opt).unwrap_err();
            assert_eq!(
                from_option,
                format!("mount option {opt:?}: {}", from_flag.message()),
                "{opt}"
            );
        }
        let o = p("uid=root,cache_size=1.5G,threads=4,transport=classic").unwrap();
        assert_eq!(o.uid.unwrap().0, parse::parse_uid("root").unwrap());
        assert_eq!(
            o.cache_size.unwrap().0,
            parse::parse_cache_size("1.5G").unwrap()
        );
        assert_eq!(o.threads.unwrap().0, 4);
        assert_eq!(o.transport.unwrap().0, Transport::Classic);
    }
}
