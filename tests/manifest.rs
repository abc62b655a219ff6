//! Every row of ../shared/testdata/MANIFEST.tsv: images written by VMware,
//! VirtualBox, ovftool, old qemu and others. Each must read with exactly the
//! recorded sha256 and virtual size, or, where the manifest says `-`, fail
//! to open with a clear one-line error (`~sha` means either).
//! Checked through the library and through a real FUSE mount.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::fuse::{vdiskfs, Mounted};

struct Row {
    file: String,
    virtual_size: Option<u64>,
    want: Want,
}

enum Want {
    Sha(String),
    Refuse,
    Either(String),
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(common::testdata().join("MANIFEST.tsv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (f, vs, sha) = (col("file"), col("virtual_size"), col("raw_sha256"));
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            let want = match c[sha] {
                "-" => Want::Refuse,
                s if s.starts_with('~') => Want::Either(s[1..].to_string()),
                s => Want::Sha(s.to_string()),
            };
            Row {
                file: c[f].to_string(),
                virtual_size: c[vs].parse().ok(),
                want,
            }
        })
        .collect()
}

fn image(row: &Row) -> PathBuf {
    common::testdata().join("images").join(&row.file)
}

#[test]
fn every_manifest_row_through_the_library() {
    let rows = rows();
    assert!(rows.len() >= 20, "manifest has only {} rows", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let path = image(row);
        let started = Instant::now();
        let opened = common::open_chain(&path);
        let outcome = match (&row.want, opened) {
            (Want::Refuse, Ok(_)) => Err("opened, but the manifest says it must be refused".into()),
            (Want::Refuse | Want::Either(_), Err(e)) => {
                let msg = e.to_string();
                if msg.contains('\n') || e.path().is_none() {
                    Err(format!(
                        "refused, but the error is not one line naming a file: {msg}"
                    ))
                } else {
                    Ok(())
                }
            }
            (Want::Sha(sha) | Want::Either(sha), Ok(chain)) => {
                if let Some(vs) = row.virtual_size {
                    if chain.size() != vs {
                        failures.push(format!("{}: size {} != {vs}", row.file, chain.size()));
                    }
                }
                match common::sha256_chain(&chain) {
                    Ok(got) if got == *sha => Ok(()),
                    Ok(got) => Err(format!("sha256 {got} != {sha}")),
                    Err(e) => Err(format!("read failed: {e}")),
                }
            }
            (Want::Sha(_), Err(e)) => Err(format!("cannot open: {e}")),
        };
        if started.elapsed() > Duration::from_secs(60) {
            failures.push(format!("{}: took {:?}", row.file, started.elapsed()));
        }
        if let Err(msg) = outcome {
            failures.push(format!("{}: {msg}", row.file));
        }
    }
    assert!(
        failures.is_empty(),
        "manifest failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_manifest_row_through_fuse_and_the_cli() {
    let mut failures = Vec::new();
    for row in rows() {
        let path = image(&row);
        let info = vdiskfs(&["info", "--json", path.to_str().unwrap()]);
        let mounted = Mounted::try_new(&[&path], &[]);
        match (&row.want, mounted) {
            (Want::Refuse, Ok(_)) => {
                failures.push(format!("{}: mounted but must be refused", row.file))
            }
            (Want::Refuse | Want::Either(_), Err(msg)) => {
                if msg.trim().lines().count() != 1 {
                    failures.push(format!("{}: error is not one line: {msg}", row.file));
                }
                if info.status.success() {
                    failures.push(format!("{}: info succeeded where mount failed", row.file));
                }
            }
            (Want::Sha(_), Err(msg)) => failures.push(format!("{}: mount failed: {msg}", row.file)),
            (Want::Sha(sha) | Want::Either(sha), Ok(m)) => {
                if !info.status.success() {
                    failures.push(format!(
                        "{}: info failed: {}",
                        row.file,
                        String::from_utf8_lossy(&info.stderr)
                    ));
                } else {
                    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
                    for key in ["format", "virtual_size", "chain"] {
                        if v.get(key).is_none() {
                            failures.push(format!("{}: info --json lacks {key}", row.file));
                        }
                    }
                }
                let name = vdiskfs::cli::exposed_name(&path).unwrap();
                let exposed = m.file(name.to_str().unwrap());
                let meta = std::fs::metadata(&exposed).unwrap();
                if Some(meta.len()) != row.virtual_size {
                    failures.push(format!("{}: exposed size {}", row.file, meta.len()));
                }
                // Big sparse disks are hashed through the library test; through
                // FUSE we hash everything up to 1 GiB.
                if meta.len() <= 1 << 30 {
                    let got = common::sha256_file(&exposed);
                    if got != *sha {
                        failures.push(format!("{}: sha256 through FUSE {got} != {sha}", row.file));
                    }
                }
                m.unmount();
            }
        }
    }
    assert!(
        failures.is_empty(),
        "manifest failures:\n{}",
        failures.join("\n")
    );
}
