//! A small HTTP/1.1 file server for the remote tests: GET and HEAD of files
//! under a directory, with `Range: bytes=a-b`, an ETag that changes when the
//! file does, `If-Match` (412), an injectable delay per request, and switches
//! to stall (accept, never answer) or refuse connections.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Shared switches of a running server.
#[derive(Default)]
pub struct Control {
    /// Refuse service: close every connection at once.
    pub down: AtomicBool,
    /// Accept connections but never answer.
    pub stall: AtomicBool,
    /// Milliseconds slept before each answer.
    pub delay_ms: AtomicU64,
    /// Body bytes sent.
    pub sent: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests being served now.
    pub busy: AtomicU64,
    /// Requests that arrived while no other was being served: with a
    /// delay well above the client's own work, the sequential round trips.
    pub rounds: AtomicU64,
}

/// A server on 127.0.0.1, serving `root`.
pub struct Httpd {
    /// The port.
    pub port: u16,
    /// Its switches.
    pub ctl: Arc<Control>,
    stop: Arc<AtomicBool>,
}

impl Httpd {
    /// Starts serving `root` on a free loopback port.
    pub fn start(root: &Path) -> Httpd {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let ctl = Arc::new(Control::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (root, c, s) = (root.to_path_buf(), ctl.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (root, c) = (root.clone(), c.clone());
                        std::thread::spawn(move || serve(conn, &root, &c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Httpd { port, ctl, stop }
    }

    /// `http://127.0.0.1:PORT/rel`.
    pub fn url(&self, rel: &str) -> String {
        format!("http://127.0.0.1:{}/{rel}", self.port)
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The ETag of a file: changes with its inode, size or modification time.
pub fn etag(meta: &std::fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}-{:x}{:x}\"",
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

/// Counts a request as served when dropped.
struct Busy<'a>(&'a Control);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(conn: TcpStream, root: &Path, ctl: &Control) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        if ctl.down.load(Ordering::Relaxed) {
            return;
        }
        if ctl.busy.fetch_add(1, Ordering::SeqCst) == 0 {
            ctl.rounds.fetch_add(1, Ordering::SeqCst);
        }
        let _busy = Busy(ctl);
        while ctl.stall.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let delay = ctl.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            let _ = std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        if respond(&mut out, root, ctl, method, target, &header).is_err() {
            return;
        }
        ctl.requests.fetch_add(1, Ordering::Relaxed);
    }
}

fn respond(
    out: &mut TcpStream,
    root: &Path,
    ctl: &Control,
    method: &str,
    target: &str,
    header: &dyn Fn(&str) -> Option<String>,
) -> std::io::Result<()> {
    let status = |out: &mut TcpStream, code: &str| {
        write!(out, "HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n")
    };
    let rel = target.trim_start_matches('/');
    if rel.split('/').any(|s| s == "..") || !(method == "GET" || method == "HEAD") {
        return status(out, "400 Bad Request");
    }
    let path: PathBuf = root.join(rel);
    let Ok(mut file) = std::fs::File::open(&path) else {
        return status(out, "404 Not Found");
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return status(out, "404 Not Found");
    }
    let len = meta.len();
    let tag = etag(&meta);
    if let Some(m) = header("if-match") {
        if m != "*" && m != tag {
            return status(out, "412 Precondition Failed");
        }
    }
    let range = header("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let a: u64 = a.parse().ok()?;
        let b: u64 = if b.is_empty() {
            len.checked_sub(1)?
        } else {
            b.parse().ok()?
        };
        Some((a, b.min(len.saturating_sub(1))))
    });
    let common = format!(
        "ETag: {tag}\r\nAccept-Ranges: bytes\r\nLast-Modified: Mon, 30 Nov 2026 00:00:00 GMT\r\n"
    );
    match range {
        Some((a, b)) if a >= len || b < a => write!(
            out,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
        ),
        Some((a, b)) => {
            let n = b - a + 1;
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\n{common}Content-Range: bytes {a}-{b}/{len}\r\nContent-Length: {n}\r\n\r\n"
            )?;
            if method == "GET" {
                file.seek(SeekFrom::Start(a))?;
                let sent = std::io::copy(&mut (&mut file).take(n), out)?;
                ctl.sent.fetch_add(sent, Ordering::Relaxed);
            }
            Ok(())
        }
        None => {
            write!(out, "HTTP/1.1 200 OK\r\n{common}Content-Length: {len}\r\n\r\n")?;
            if method == "GET" {
                let sent = std::io::copy(&mut file, out)?;
                ctl.sent.fetch_add(sent, Ordering::Relaxed);
            }
            Ok(())
        }
    }
}

/// Takes the process's remote client for the calling test and sets its
/// tuning. The client (settings, chunk cache, the limit on requests in
/// flight, the traffic counters) is one per process, as in the daemon, and
/// every test of this binary runs in one process: a test that reads remote
/// files in-process holds the guard for its whole run, so another test's
/// settings or requests never count in its measurements (a round count, a
/// request count, bytes sent). Tests that mount run their own daemon and
/// need none.
pub fn remote_client(settings: vdiskfs::remote::Settings) -> std::sync::MutexGuard<'static, ()> {
    static CLIENT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = CLIENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    vdiskfs::remote::configure(settings);
    guard
}
