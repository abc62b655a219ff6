//! `vdiskfs generate`: man pages and shell completions, written from the
//! clap definitions of the command line so they can never drift from it
//! (hidden; used by `mount-helper/install.sh` and packagers).

use std::path::PathBuf;

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::{Error, Result};

/// What to write.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum What {
    /// `vdiskfs.1` and one page per command (`vdiskfs-mount.1`, …).
    Man,
    /// The completion script of one shell (`--shell`).
    Completions,
}

/// `vdiskfs generate`.
#[derive(Debug, Args, Clone)]
pub struct GenerateArgs {
    /// Man pages or completions.
    #[arg(value_enum)]
    pub what: What,
    /// The directory to write into (created if missing).
    pub dir: PathBuf,
    /// The shell, for completions.
    #[arg(long, value_enum, required_if_eq("what", "completions"))]
    pub shell: Option<Shell>,
}

/// Writes what `args` asks for and prints the files written.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let fail = |what: &str, e: std::io::Error| Error::io(what.to_string(), e).with_path(&args.dir);
    std::fs::create_dir_all(&args.dir).map_err(|e| fail("cannot create the directory", e))?;
    let mut cmd = Cli::command();
    cmd.build();
    match args.what {
        What::Man => {
            for page in man_pages(&cmd) {
                let path = args.dir.join(format!("{}.1", page.get_name()));
                let mut out = Vec::new();
                clap_mangen::Man::new(page)
                    .render(&mut out)
                    .map_err(|e| fail("cannot render a man page", e))?;
                std::fs::write(&path, out).map_err(|e| fail("cannot write a man page", e))?;
                println!("{}", path.display());
            }
        }
        What::Completions => {
            let shell = args
                .shell
                .ok_or_else(|| Error::invalid("--shell is required"))?;
            let path = clap_complete::generate_to(shell, &mut cmd, "vdiskfs", &args.dir)
                .map_err(|e| fail("cannot write the completions", e))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

/// The top page and one per visible command, named as man(1) expects
/// (`vdiskfs-mount`), each with the version of the whole program.
fn man_pages(cmd: &clap::Command) -> Vec<clap::Command> {
    let mut pages = vec![cmd.clone()];
    let visible = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help");
    for sub in visible {
        let name = format!("vdiskfs-{}", sub.get_name());
        let mut page = sub.clone().name(name.clone()).display_name(name);
        if let Some(v) = cmd.get_version() {
            page = page.version(v.to_string());
        }
        pages.push(page);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_visible_command_gets_a_page() {
        let mut cmd = Cli::command();
        cmd.build();
        let names: Vec<String> = man_pages(&cmd)
            .iter()
            .map(|c| c.get_name().to_string())
            .collect();
        for sub in ["mount", "unmount", "info", "list", "map", "serve"] {
            assert!(names.contains(&format!("vdiskfs-{sub}")), "{names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("generate") || n.ends_with("-help")),
            "{names:?}"
        );
    }
}
