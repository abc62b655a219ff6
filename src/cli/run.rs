//! The program's edge: parses the command line, validates it into a
//! configuration ([`super::config`]), sets up logging, runs the command and
//! prints any error once, on one line. Usage errors (clap's, and an
//! invalid combination of flags and `-o` options) exit with 2, every other
//! failure with 1 (mount.vdiskfs maps these to mount(8)'s codes).

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use log::LevelFilter;

use super::config::MountConfig;
use super::{Cli, Command};
use crate::daemon;
use crate::error::Result;

/// The command to run, its arguments validated.
enum Job {
    /// `vdiskfs mount`.
    Mount(MountConfig),
    /// Every other command.
    Other(Command),
}

/// Entry point: parses arguments, validates them, runs the command, prints
/// any error on one line.
pub fn main() -> ExitCode {
    let notify_fd = daemon::take_notify_fd();
    let cli = match Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&one_line(&e)),
    };
    let Cli {
        verbose,
        quiet,
        command,
    } = cli;
    let job = match command {
        Command::Mount(args) => match MountConfig::new(&args) {
            Ok(mut cfg) => {
                if let Some(fd) = notify_fd {
                    // This is the detached daemon.
                    cfg.foreground = true;
                    cfg.notify_fd = Some(fd);
                }
                Job::Mount(cfg)
            }
            Err(e) => return usage_error(&e.to_string()),
        },
        Command::Serve(mut args) => {
            if let Some(fd) = notify_fd {
                args.foreground = true;
                args.notify_fd = Some(fd);
            }
            Job::Other(Command::Serve(args))
        }
        other => Job::Other(other),
    };
    if let Err(e) = init_logging(verbose, quiet, &job) {
        let _ = writeln!(std::io::stderr(), "vdiskfs: {e}");
        return ExitCode::FAILURE;
    }
    match run(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "vdiskfs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a usage error and returns its exit status.
fn usage_error(msg: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "vdiskfs: {msg}");
    ExitCode::from(2)
}

/// A clap error on one line, like every other error: its first paragraph
/// (which names the missing or bad argument on its following lines) joined.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = first.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    let msg = if msg.is_empty() {
        "invalid arguments"
    } else {
        msg
    };
    format!("{msg} (see vdiskfs --help)")
}

/// The log level: `--log-level` (either spelling), else -v/-q (given
/// before or after `mount`: `verbose` and `quiet` are the top level's).
fn level(verbose: u8, quiet: bool, job: &Job) -> LevelFilter {
    let (verbose, quiet) = match job {
        Job::Mount(m) => {
            if let Some(crate::logging::LogSpec::Level(l)) = m.log_level {
                return l;
            }
            (verbose.saturating_add(m.verbose), quiet || m.quiet)
        }
        Job::Other(_) => (verbose, quiet),
    };
    if quiet {
        return LevelFilter::Error;
    }
    match verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Where a detached daemon with a `--log-file` logs. `None` for everything
/// else: stderr, or syslog for a detached daemon (see [`init_logging`]).
fn detached_log_target(job: &Job) -> Option<env_logger::Target> {
    let (notify_fd, log_file) = match job {
        Job::Mount(m) => (m.notify_fd, &m.disk.log_file),
        Job::Other(Command::Serve(s)) => (s.notify_fd, &s.disk.log_file),
        Job::Other(_) => return None,
    };
    notify_fd?;
    if let Some(p) = log_file {
        match daemon::open_log_file(p) {
            Ok(f) => return Some(env_logger::Target::Pipe(Box::new(f))),
            Err(e) => daemon::Syslog::new().line(&format!(
                "cannot open log file {}: {e}; logging to syslog",
                p.display()
            )),
        }
    }
    None
}

/// Installs the logger. libvirt-style outputs or filters (`--log-level`
/// with outputs, `--log-filters`) go through [`crate::logging::Dispatch`];
/// a plain level keeps env_logger, `RUST_LOG` overriding.
fn init_logging(verbose: u8, quiet: bool, job: &Job) -> Result<()> {
    use crate::logging::{Dispatch, LogSpec, Output, Sink};
    if let Job::Mount(m) = job {
        if let Some(LogSpec::Outputs(outputs)) = &m.log_level {
            if m.disk.log_file.is_some() {
                return Err(crate::error::Error::invalid(
                    "--log-file cannot be combined with --log-level outputs: \
                     give the file as LEVEL:file:/PATH",
                ));
            }
            let filters = m.log_filters.clone().unwrap_or_default().0;
            Dispatch::open(outputs, filters)?.install();
            return Ok(());
        }
        if let Some(filters) = &m.log_filters {
            // Filters with a plain level: one output, where logs go by default.
            let sink = match (&m.disk.log_file, m.notify_fd) {
                (Some(p), Some(_)) => Sink::File(std::path::absolute(p).unwrap_or(p.clone())),
                (None, Some(_)) => Sink::Syslog("vdiskfs".into()),
                _ => Sink::Stderr,
            };
            let out = Output {
                level: level(verbose, quiet, job),
                sink,
            };
            Dispatch::open(&[out], filters.0.clone())?.install();
            return Ok(());
        }
    }
    let mut b = env_logger::Builder::new();
    b.filter_level(level(verbose, quiet, job));
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    let detached = matches!(job, Job::Mount(m) if m.notify_fd.is_some());
    match detached_log_target(job) {
        Some(t) => {
            b.target(t);
        }
        // A detached daemon without a log file: syslog, its terminal is gone.
        None if detached => {
            daemon::SyslogLogger::install(b.build());
            return Ok(());
        }
        None => {}
    }
    let _ = b.try_init();
    Ok(())
}

fn run(job: Job) -> Result<()> {
    let command = match job {
        Job::Mount(cfg) => return super::mount::run(cfg),
        Job::Other(c) => c,
    };
    match command {
        // main() validates every mount into a Job::Mount already.
        Command::Mount(args) => super::mount::run(MountConfig::new(&args)?),
        Command::Unmount(u) => daemon::unmount(
            &u.mountpoint,
            u.lazy,
            std::time::Duration::from_secs(u.timeout),
        ),
        Command::Info(i) => super::report::info_cmd(&i),
        Command::List(l) => super::report::list_cmd(&l),
        Command::Map(m) => super::report::map_cmd(&m),
        Command::Serve(s) => crate::nbd::cmd::run(s),
        Command::Generate(g) => crate::generate::run(&g),
    }
}
