//! Build script: records the git commit the binary was built from, for
//! `vdiskfs --version`. Tolerates building without git or outside a
//! checkout (a source tarball): the version is then the crate's alone.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let full = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => format!("{version} (git {commit})"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=VDISKFS_VERSION={full}");
    // Rebuild when HEAD moves: HEAD itself (a branch switch) and the ref it
    // names (a commit). In a worktree these live under its own git dir.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // A packed ref has no file of its own: watch packed-refs then (a
        // missing path would rerun this script on every build).
        for name in [r.as_str(), "packed-refs"] {
            if let Some(path) = git(&["rev-parse", "--git-path", name]) {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
