//! The daemon's log outputs and filters, in libvirt's model.
//!
//! `--log-level` takes a plain level name (`off`, `error` … `trace`, as
//! before), or libvirt's `log_outputs` syntax: outputs separated by spaces,
//! each `LEVEL:stderr`, `LEVEL:syslog:IDENT` or `LEVEL:file:PATH`, where
//! LEVEL is libvirt's number (1 debug, 2 info, 3 warning, 4 error) or a
//! level name. Each output has its own minimum level: `1:file:/tmp/x
//! 3:stderr` sends everything to the file and only warnings and errors to
//! stderr. `--log-filters` takes libvirt's `log_filters`: `LEVEL:NAME`
//! entries separated by spaces, NAME naming our modules with dots
//! (`format.qcow2`, `fs`, `nbd.server`): a record whose module matches a
//! filter is kept at that filter's level or above; records matching no
//! filter use the most verbose output's level. NAME without `*` matches any
//! module whose path contains it; with `*` it must match the whole path
//! (`format.*.write`). The first matching filter decides. libvirt's `+`
//! (stack traces) is accepted and ignored.
//!
//! Records keep their level all the way: [`Dispatch`] is one `log::Log`
//! handing each record to every output whose level it reaches; syslog gets
//! the record's level as its priority. What is not here: libvirt's
//! `journald` output (no journald on the machines this is built for; the
//! journal reads syslog anyway), which is refused by name.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use log::{Level, LevelFilter};

/// What `--log-level` (`-o log_level=`) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSpec {
    /// A plain level: the usual destination (stderr, the `--log-file` or
    /// syslog for a detached daemon), `RUST_LOG` overriding.
    Level(LevelFilter),
    /// libvirt-style outputs, each with its own level.
    Outputs(Vec<Output>),
}

/// One libvirt-style output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Records below this level are not sent here.
    pub level: LevelFilter,
    /// Where records go.
    pub sink: Sink,
}

/// Where an output sends its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// The process's standard error.
    Stderr,
    /// syslog (daemon facility) under this identifier.
    Syslog(String),
    /// Appended to this file.
    File(PathBuf),
}

/// One libvirt-style filter: records from matching modules pass at `level`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The level matching records must reach.
    pub level: LevelFilter,
    /// The module pattern, dots as separators (`format.qcow2`).
    pub pattern: String,
}

/// A level as libvirt numbers it (1 debug … 4 error) or by name.
fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s {
        "1" => Ok(LevelFilter::Debug),
        "2" => Ok(LevelFilter::Info),
        "3" => Ok(LevelFilter::Warn),
        "4" => Ok(LevelFilter::Error),
        _ => s.parse::<LevelFilter>().map_err(|_| {
            format!(
                "unknown log level {s:?} (use off, error, warn, info, debug or trace, \
                 or libvirt's 1 debug, 2 info, 3 warning, 4 error)"
            )
        }),
    }
}

impl LogSpec {
    /// Parses `--log-level`: a level name, or libvirt outputs.
    pub fn parse(s: &str) -> Result<LogSpec, String> {
        let s = s.trim();
        if !s.contains(':') {
            return s.parse::<LevelFilter>().map(LogSpec::Level).map_err(|_| {
                format!(
                    "unknown log level {s:?} (use off, error, warn, info, debug or trace, \
                     or libvirt outputs such as \"1:file:/var/log/vdiskfs.log 3:stderr\")"
                )
            });
        }
        let mut outputs = Vec::new();
        for item in s.split_whitespace() {
            outputs.push(parse_output(item)?);
        }
        let files = outputs
            .iter()
            .filter(|o| matches!(o.sink, Sink::File(_)))
            .count();
        if files > 1 {
            return Err("at most one file output (SIGHUP reopens it)".into());
        }
        let idents: std::collections::HashSet<&str> = outputs
            .iter()
            .filter_map(|o| match &o.sink {
                Sink::Syslog(i) => Some(i.as_str()),
                _ => None,
            })
            .collect();
        if idents.len() > 1 {
            return Err("one syslog identifier per process: give one syslog output".into());
        }
        Ok(LogSpec::Outputs(outputs))
    }
}

/// One `LEVEL:KIND[:ARG]` output.
fn parse_output(item: &str) -> Result<Output, String> {
    let bad = |why: &str| format!("log output {item:?}: {why}");
    let (level, rest) = item
        .split_once(':')
        .ok_or_else(|| bad("expected LEVEL:stderr, LEVEL:syslog:IDENT or LEVEL:file:PATH"))?;
    let level = parse_level(level).map_err(|e| bad(&e))?;
    let (kind, arg) = match rest.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (rest, None),
    };
    let sink = match (kind, arg) {
        ("stderr", None) => Sink::Stderr,
        ("syslog", Some(ident)) if !ident.is_empty() && !ident.contains('\0') => {
            Sink::Syslog(ident.to_string())
        }
        ("syslog", _) => return Err(bad("syslog needs an identifier (LEVEL:syslog:vdiskfs)")),
        ("file", Some(path)) if path.starts_with('/') => Sink::File(PathBuf::from(path)),
        ("file", _) => return Err(bad("file needs an absolute path (LEVEL:file:/path)")),
        ("journald", _) => return Err(bad(
            "the journald output is not supported; use LEVEL:syslog:IDENT (journald reads syslog)",
        )),
        ("stderr", Some(_)) => return Err(bad("stderr takes no argument")),
        _ => {
            return Err(bad(&format!(
                "unknown output {kind:?} (stderr, syslog:IDENT or file:PATH)"
            )))
        }
    };
    Ok(Output { level, sink })
}

/// The filters of one `--log-filters` value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filters(pub Vec<Filter>);

/// Parses `--log-filters`: libvirt's `LEVEL:NAME` entries separated by spaces.
pub fn parse_filters(s: &str) -> Result<Filters, String> {
    let mut out = Vec::new();
    for item in s.split_whitespace() {
        let bad = |why: &str| format!("log filter {item:?}: {why}");
        let (level, name) = item
            .split_once(':')
            .ok_or_else(|| bad("expected LEVEL:NAME, e.g. 1:format.qcow2"))?;
        let level = parse_level(level).map_err(|e| bad(&e))?;
        let name = name.strip_prefix('+').unwrap_or(name);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || "._*".contains(c))
        {
            return Err(bad(
                "NAME is a module path with dots, e.g. format.qcow2 or nbd.*",
            ));
        }
        out.push(Filter {
            level,
            pattern: name.to_string(),
        });
    }
    if out.is_empty() {
        return Err("--log-filters needs at least one LEVEL:NAME".into());
    }
    Ok(Filters(out))
}

/// A record's module path in filter spelling: `vdiskfs::format::qcow2` →
/// `format.qcow2`.
fn module_of(target: &str) -> String {
    let t = target.strip_prefix("vdiskfs::").unwrap_or(target);
    t.replace("::", ".")
}

/// `*`-only glob over the whole string.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl Filter {
    fn matches(&self, module: &str) -> bool {
        if self.pattern.contains('*') {
            glob(&self.pattern, module)
        } else {
            module.contains(&self.pattern)
        }
    }
}

/// An output opened for writing.
enum Open {
    Stderr,
    Syslog,
    File(Mutex<crate::daemon::LogWriter>),
}

/// The `log::Log` that filters each record once, then sends it to every
/// output whose level it reaches.
pub struct Dispatch {
    outputs: Vec<(LevelFilter, Open)>,
    filters: Vec<Filter>,
    /// The level of records no filter matches: the most verbose output's.
    default: LevelFilter,
}

impl Dispatch {
    /// Opens every output (a file that cannot be opened is an error naming
    /// it) and the filters.
    pub fn open(outputs: &[Output], filters: Vec<Filter>) -> crate::Result<Dispatch> {
        let mut opened = Vec::new();
        for o in outputs {
            let sink = match &o.sink {
                Sink::Stderr => Open::Stderr,
                Sink::Syslog(ident) => {
                    open_syslog(ident);
                    Open::Syslog
                }
                Sink::File(p) => {
                    Open::File(Mutex::new(crate::daemon::open_log_file(p).map_err(
                        |e| crate::Error::io("cannot open the log file", e).with_path(p),
                    )?))
                }
            };
            opened.push((o.level, sink));
        }
        let default = outputs
            .iter()
            .map(|o| o.level)
            .max()
            .unwrap_or(LevelFilter::Off);
        Ok(Dispatch {
            outputs: opened,
            filters,
            default,
        })
    }

    /// The most verbose level any record can pass at (for
    /// `log::set_max_level`): the most verbose output's, as a record an
    /// output would drop is not worth formatting.
    pub fn max_level(&self) -> LevelFilter {
        self.default
    }

    /// The level records from `target` must reach.
    fn threshold(&self, target: &str) -> LevelFilter {
        let module = module_of(target);
        self.filters
            .iter()
            .find(|f| f.matches(&module))
            .map_or(self.default, |f| f.level)
    }

    /// Installs `self` as the process's logger.
    pub fn install(self) {
        let max = self.max_level();
        if log::set_boxed_logger(Box::new(self)).is_ok() {
            log::set_max_level(max);
        }
    }
}

/// Opens syslog under `ident` (the daemon facility, with the pid).
fn open_syslog(ident: &str) {
    let c = std::ffi::CString::new(ident).unwrap_or_else(|_| c"vdiskfs".to_owned());
    // openlog keeps the pointer: the identifier must live as long as the
    // process, hence leaked (once: one syslog identifier per process).
    let ident: &'static std::ffi::CStr = Box::leak(c.into_boxed_c_str());
    let _ = nix::syslog::openlog(
        Some(ident),
        nix::syslog::LogFlags::LOG_PID,
        nix::syslog::Facility::LOG_DAEMON,
    );
}

fn priority(level: Level) -> nix::syslog::Severity {
    use nix::syslog::Severity;
    match level {
        Level::Error => Severity::LOG_ERR,
        Level::Warn => Severity::LOG_WARNING,
        Level::Info => Severity::LOG_INFO,
        Level::Debug | Level::Trace => Severity::LOG_DEBUG,
    }
}

impl log::Log for Dispatch {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.threshold(metadata.target())
    }

    fn log(&self, record: &log::Record<'_>) {
        if !log::Log::enabled(self, record.metadata()) {
            return;
        }
        let body = format!("{} {}: {}", record.level(), record.target(), record.args());
        for (level, out) in &self.outputs {
            if record.level() > *level {
                continue;
            }
            match out {
                Open::Stderr => {
                    let _ = writeln!(std::io::stderr(), "[{}] {body}", timestamp());
                }
                Open::Syslog => {
                    // nix passes the text as the argument of "%s".
                    let _ = nix::syslog::syslog(
                        priority(record.level()),
                        body.replace('\0', "").as_str(),
                    );
                }
                Open::File(f) => {
                    let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = writeln!(f, "[{}] {body}", timestamp());
                }
            }
        }
    }

    fn flush(&self) {}
}

/// UTC date and time with milliseconds, for stderr and file lines.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:03}",
        crate::info::utc_date(now.as_secs()),
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_levels_and_libvirt_outputs_parse() {
        assert_eq!(
            LogSpec::parse("debug"),
            Ok(LogSpec::Level(LevelFilter::Debug))
        );
        let spec = LogSpec::parse("1:file:/var/log/vd.log  3:stderr 2:syslog:vd").unwrap();
        assert_eq!(
            spec,
            LogSpec::Outputs(vec![
                Output {
                    level: LevelFilter::Debug,
                    sink: Sink::File("/var/log/vd.log".into())
                },
                Output {
                    level: LevelFilter::Warn,
                    sink: Sink::Stderr
                },
                Output {
                    level: LevelFilter::Info,
                    sink: Sink::Syslog("vd".into())
                },
            ])
        );
        assert_eq!(
            LogSpec::parse("4:stderr trace:file:/x"),
            Ok(LogSpec::Outputs(vec![
                Output {
                    level: LevelFilter::Error,
                    sink: Sink::Stderr
                },
                Output {
                    level: LevelFilter::Trace,
                    sink: Sink::File("/x".into())
                },
            ]))
        );
    }

    #[test]
    fn bad_outputs_say_what_is_wrong() {
        for (spec, needle) in [
            ("chatty", "unknown log level \"chatty\""),
            ("5:stderr", "unknown log level \"5\""),
            ("1:file:relative.log", "absolute path"),
            ("1:file", "absolute path"),
            ("1:syslog", "needs an identifier"),
            ("1:journald", "journald output is not supported"),
            ("1:stderr:x", "takes no argument"),
            ("1:pipe:/x", "unknown output \"pipe\""),
            ("1:file:/a 2:file:/b", "at most one file output"),
            ("1:syslog:a 2:syslog:b", "one syslog identifier"),
        ] {
            let e = LogSpec::parse(spec).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn filters_parse_and_match_module_paths() {
        let f = parse_filters("1:format.qcow2 3:+fs 4:nbd.*.tls").unwrap().0;
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].pattern, "fs");
        for (spec, needle) in [
            ("", "at least one"),
            ("qcow2", "expected LEVEL:NAME"),
            ("9:fs", "unknown log level \"9\""),
            ("1:fs/ops", "module path with dots"),
        ] {
            let e = parse_filters(spec).unwrap_err();
            assert!(e.contains(needle), "{spec:?}: {e}");
        }
        let d = Dispatch {
            outputs: Vec::new(),
            filters: f,
            default: LevelFilter::Info,
        };
        assert_eq!(
            d.threshold("vdiskfs::format::qcow2::write"),
            LevelFilter::Debug
        );
        assert_eq!(d.threshold("vdiskfs::fs::ops"), LevelFilter::Warn);
        assert_eq!(d.threshold("vdiskfs::nbd::server::tls"), LevelFilter::Error);
        assert_eq!(d.threshold("vdiskfs::nbd::server"), LevelFilter::Info);
        assert_eq!(d.threshold("vdiskfs::chain"), LevelFilter::Info);
        assert!(glob("a*c", "abc") && glob("*", "") && !glob("a*c", "ab"));
        assert!(glob("nbd.*", "nbd.server") && !glob("nbd.*", "fs.nbd"));
    }
}
