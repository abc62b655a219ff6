//! A `vdiskfs serve` process for the NBD tests, and a minimal raw client
//! for the protocol tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fuse::{bin, wait_gone};

/// A running `vdiskfs serve` on a Unix socket; stopped with SIGTERM on drop.
pub struct Served {
    _dir: tempfile::TempDir,
    /// The socket path.
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Served {
    /// Serves `images` with extra `opts`; panics if it does not listen.
    pub fn new(images: &[&Path], opts: &[&str]) -> Served {
        Self::try_new(images, opts).unwrap_or_else(|e| panic!("vdiskfs serve failed: {e}"))
    }

    /// Serves `images`, or returns the server's error output.
    pub fn try_new(images: &[&Path], opts: &[&str]) -> Result<Served, String> {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(opts)
            .args(images)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run vdiskfs serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", stderr_text(&mut child)));
            }
            assert!(
                Instant::now() < deadline,
                "vdiskfs serve did not listen in 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Served {
            _dir: dir,
            socket,
            child: Some(child),
        })
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Stops the server with SIGTERM and returns its exit status and stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill on a child we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        wait_gone(child.id());
        (status, stderr_text(&mut child))
    }

    /// True while the server process runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on a child we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Builds client bytes: the handshake flags, options, requests.
#[derive(Default, Clone)]
pub struct Wire(pub Vec<u8>);

impl Wire {
    /// Client flags (fixed newstyle, no zeroes).
    pub fn hello(mut self) -> Self {
        self.0.extend_from_slice(&3u32.to_be_bytes());
        self
    }
    /// One option with payload.
    pub fn option(mut self, opt: u32, data: &[u8]) -> Self {
        self.0.extend_from_slice(b"IHAVEOPT");
        self.0.extend_from_slice(&opt.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
    /// NBD_OPT_STRUCTURED_REPLY.
    pub fn structured(self) -> Self {
        self.option(8, &[])
    }
    /// NBD_OPT_SET_META_CONTEXT for `base:allocation` on `export`.
    pub fn meta(self, export: &str) -> Self {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        let q = b"base:allocation";
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        self.option(10, &d)
    }
    /// NBD_OPT_GO for `export`, no info requests.
    pub fn go(self, export: &str) -> Self {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d)
    }
    /// One request header (and payload).
    pub fn request(
        mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        off: u64,
        len: u32,
        data: &[u8],
    ) -> Self {
        self.0.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self.0.extend_from_slice(&off.to_be_bytes());
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
}

/// A raw connection to a served socket.
pub struct Raw(pub UnixStream);

impl Raw {
    /// Connects and reads the 18-byte greeting.
    pub fn connect(socket: &Path) -> Raw {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        Raw(s)
    }
    /// Sends bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    /// Reads exactly `n` bytes.
    pub fn read(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.0.read_exact(&mut v).unwrap();
        v
    }
    /// Reads option replies until the ACK (or an error) of the current
    /// option: returns the reply types seen.
    pub fn option_replies(&mut self) -> Vec<u32> {
        let mut kinds = Vec::new();
        loop {
            let h = self.read(20);
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            self.read(len as usize);
            kinds.push(kind);
            if kind == 1 || kind & 0x8000_0000 != 0 {
                return kinds;
            }
        }
    }
    /// True once the server has closed the connection (EOF within 20 s).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Everything `child` wrote to its piped stderr.
fn stderr_text(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    err
}

/// `nbdinfo --size uri`, run to its end whatever its outcome (the caller
/// checks success: some tests expect a refusal).
pub fn nbdinfo_size(uri: impl AsRef<std::ffi::OsStr>) -> std::process::Output {
    Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .output()
        .expect("cannot run nbdinfo: install libnbd-bin")
}
