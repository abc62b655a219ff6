//! Real FUSE mounts for end-to-end tests, through the built `vdiskfs` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `vdiskfs` binary under test. `VDISKFS_TEST_TRANSPORT=uring|classic`
/// runs every mount of the suite on that transport (passed to the daemons
/// as `VDISKFS_TRANSPORT`, the default of `--transport`).
pub fn bin() -> &'static str {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some(t) = std::env::var_os("VDISKFS_TEST_TRANSPORT") {
            std::env::set_var("VDISKFS_TRANSPORT", t);
        }
    });
    env!("CARGO_BIN_EXE_vdiskfs")
}

/// True while `pid` runs (the daemon's own check: a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    vdiskfs::daemon::process_alive(pid)
}

/// Waits until the process `pid` is gone (see [`alive`]); panics after 20 s.
pub fn wait_gone(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} still running 20 s after it was told to end"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Fails (never skips) when FUSE is not usable here.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse) and install fuse3 \
         (apt-get install fuse3); this test does not skip"
    );
}

/// Runs `vdiskfs ARGS`, returning its output whatever the exit status.
pub fn vdiskfs(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("cannot run vdiskfs")
}

/// A live mount, unmounted on drop.
pub struct Mounted {
    /// Holds the mount point directory.
    _dir: tempfile::TempDir,
    /// The mount point.
    pub mountpoint: PathBuf,
    live: bool,
}

impl Mounted {
    /// Mounts `images` (with extra options) on a fresh directory; panics with
    /// vdiskfs's message on failure.
    pub fn new(images: &[&Path], opts: &[&str]) -> Mounted {
        match Self::try_new(images, opts) {
            Ok(m) => m,
            Err(msg) => panic!("vdiskfs mount failed: {msg}"),
        }
    }

    /// Like [`Mounted::new`] but returns vdiskfs's stderr on failure.
    pub fn try_new(images: &[&Path], opts: &[&str]) -> Result<Mounted, String> {
        require_fuse();
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let mut args: Vec<&str> = vec!["mount"];
        args.extend_from_slice(opts);
        for i in images {
            args.push(i.to_str().unwrap());
        }
        args.push(mp.to_str().unwrap());
        let out = vdiskfs(&args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Mounted {
            _dir: dir,
            mountpoint: mp,
            live: true,
        })
    }

    /// Path of an exposed file.
    pub fn file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Unmounts now, asserting success.
    pub fn unmount(mut self) {
        self.live = false;
        let out = vdiskfs(&["unmount", self.mountpoint.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "unmount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.live {
            let _ = vdiskfs(&["unmount", "--lazy", self.mountpoint.to_str().unwrap()]);
        }
    }
}

/// `vdiskfs info ARGS PATH` in a child limited to 512 MiB of address
/// space and 20 s (hostile images): (exit code, stderr, duration).
pub fn info_bounded(path: &Path, args: &[&str]) -> (Option<i32>, String, std::time::Duration) {
    super::require_tool("prlimit", "util-linux");
    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .args(["20", "prlimit", "--as=536870912", "--"])
        .arg(bin())
        .arg("info")
        .args(args)
        .arg(path)
        .output()
        .expect("cannot run timeout");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// The entry of `vdiskfs list --json` for the mount `m`.
pub fn listed(m: &Mounted) -> serde_json::Value {
    let list = vdiskfs(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["mountpoint"].as_str() == m.mountpoint.to_str())
        .unwrap_or_else(|| panic!("{} is not listed", m.mountpoint.display()))
        .clone()
}

/// The pid of the daemon serving `m`, from `vdiskfs list --json`.
pub fn daemon_pid(m: &Mounted) -> i32 {
    listed(m)["pid"].as_i64().expect("pid") as i32
}

/// `vdiskfs info --json image`, which must succeed: the JSON, and its text
/// (for `contains` checks on keys).
pub fn info_json(image: &Path) -> (serde_json::Value, String) {
    let out = vdiskfs(&["info", "--json", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v.to_string();
    (v, text)
}

/// Mounts `image` read-only and checks the exposed file against
/// `qemu-img convert`; returns the exposed name.
pub fn assert_fuse_read_matches_qemu(image: &Path) -> String {
    let m = Mounted::new(&[image], &[]);
    let name = ::vdiskfs::cli::exposed_name(image).unwrap();
    let name = name.to_str().unwrap().to_owned();
    let got = std::fs::read(m.file(&name)).unwrap();
    assert!(
        got == super::qemu_raw(image, None),
        "FUSE read differs from qemu-img convert"
    );
    m.unmount();
    name
}

/// Runs `vdiskfs args`, which must fail with `words` on stderr.
pub fn assert_refused_with(args: &[&str], words: &str) {
    let o = vdiskfs(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(words), "{args:?}: {err}");
}
