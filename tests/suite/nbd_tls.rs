//! NBD over TLS and the TCP allow-list, with real clients: `nbdinfo` and
//! `nbdcopy` (`nbds://` URIs with `tls-certificates=DIR`) and qemu
//! (`--object tls-creds-x509`), certificates made by `openssl` in each
//! test. A server with TLS refuses plaintext clients (`NBD_REP_ERR_TLS_REQD`)
//! and, with `--tls-verify-peer`, clients without a certificate of its CA.

use crate::common;
use common::free_port;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::nbd::{nbdinfo_size, Raw, Served, Wire};
use common::{qemu_img, qemu_io, qemu_raw, require_tool, run};

fn need_clients() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("openssl", "openssl");
    require_tool("qemu-img", "qemu-utils");
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args));
}

/// A scratch folder holding a CA and certificates in `pki/`.
fn scratch_with_pki() -> (tempfile::TempDir, PathBuf) {
    let dir = common::scratch();
    let pki = dir.path().join("pki");
    make_pki(&pki);
    (dir, pki)
}

/// [`scratch_with_pki`] and a raw disk `plain.img` of `len` bytes `fill`.
fn pki_and_plain(fill: u8, len: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, pki) = scratch_with_pki();
    let img = dir.path().join("plain.img");
    std::fs::write(&img, vec![fill; len]).unwrap();
    (dir, pki, img)
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, in `dir`, with qemu's file names (`ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
/// `client-key.pem`).
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=vdiskfs test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    openssl(dir, &ca);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let extfile = format!("{who}.ext");
        std::fs::write(
            dir.join(&extfile),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{ext}"),
        )
        .unwrap();
        let (key, csr, cert) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
        );
        let subj = format!("/CN={who}");
        let mut req = vec!["req", "-subj", &subj, "-keyout", &key, "-out", &csr];
        req.extend(ec);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-extfile",
                &extfile,
            ],
        );
    }
}

/// A client credentials directory holding `files` of the PKI.
fn client_dir(pki: &Path, name: &str, files: &[&str]) -> PathBuf {
    let d = pki.parent().unwrap().join(name);
    std::fs::create_dir_all(&d).unwrap();
    for f in files {
        std::fs::copy(pki.join(f), d.join(f)).unwrap();
    }
    d
}

/// `vdiskfs serve` on TCP, stopped with SIGTERM on drop.
struct TcpServed {
    child: Child,
    port: u16,
}

impl TcpServed {
    fn new(image: &Path, opts: &[&str]) -> TcpServed {
        let port = free_port();
        let mut child = Command::new(common::fuse::bin())
            .args(["serve", "--listen", &format!("tcp:127.0.0.1:{port}")])
            .args(opts)
            .arg(image)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                let mut e = String::new();
                child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
                panic!("serve exited with {st}: {e}");
            }
            assert!(Instant::now() < deadline, "serve did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        TcpServed { child, port }
    }

    /// The `nbds://` URI of `export` with client credentials `creds`.
    fn nbds(&self, export: &str, creds: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
            self.port,
            creds.display()
        )
    }

    /// qemu's `--object` and `--image-opts` arguments for `export` over TLS.
    fn qemu_tls(&self, export: &str, creds: &Path) -> [String; 4] {
        [
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0",
                self.port
            ),
        ]
    }

    /// Stops the server; returns its stderr.
    fn stop(mut self) -> String {
        // SAFETY: kill on a child we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        let mut e = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut e)
            .unwrap();
        assert!(st.success(), "serve exited with {st}: {e}");
        e
    }
}

impl Drop for TcpServed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fails(o: Output) -> String {
    assert!(!o.status.success(), "succeeded: {o:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A two-layer qcow2 chain with data in both layers and holes.
fn chain(dir: &Path) -> PathBuf {
    common::qcow2_pair(
        dir,
        "48M",
        &["write -P 0xab 0 5M", "write -c -P 0x77 16M 1M"],
        &["write -P 0x11 1M 3M", "write -P 0x99 40M 100k"],
    )
}

#[test]
fn tls_clients_read_the_chain_byte_exact_and_plaintext_clients_are_refused() {
    need_clients();
    let (dir, pki) = scratch_with_pki();
    let top = chain(dir.path());
    let expected = qemu_raw(&top, None);
    let s = TcpServed::new(&top, &["--tls-creds", pki.to_str().unwrap()]);
    let creds = client_dir(&pki, "client", &["ca-cert.pem"]);
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(s.nbds("", &creds)));
    assert!(list.contains("with TLS"), "{list}");
    assert!(list.contains("export=\"disk\""), "{list}");
    // nbdcopy with several connections, and qemu-img, byte-exact.
    let out = dir.path().join("copy.raw");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(s.nbds("disk", &creds))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == expected, "nbdcopy over TLS");
    let q = dir.path().join("qemu.raw");
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(s.qemu_tls("disk", &creds));
    args.extend(["-O".into(), "raw".into(), q.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&args);
    assert!(std::fs::read(&q).unwrap() == expected, "qemu-img over TLS");
    // Plaintext clients: refused with TLS_REQD, which qemu reports.
    let e = fails(
        Command::new("qemu-img")
            .args(["info", &format!("nbd://127.0.0.1:{}/disk", s.port)])
            .output()
            .unwrap(),
    );
    assert!(e.contains("TLS negotiation required"), "{e}");
    assert!(e.contains("this server requires TLS"), "{e}");
    fails(
        Command::new("nbdinfo")
            .arg(format!("nbd://127.0.0.1:{}/disk", s.port))
            .output()
            .unwrap(),
    );
    // A client that does not trust the server's CA fails the handshake.
    let other = dir.path().join("other");
    make_pki(&other);
    let stranger = client_dir(&other, "stranger", &["ca-cert.pem"]);
    fails(nbdinfo_size(s.nbds("disk", &stranger)));
    // Still serving.
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(s.nbds("disk", &creds)));
    assert_eq!(size.trim(), expected.len().to_string());
    s.stop();
}

#[test]
fn writes_over_tls_are_verified_and_the_image_checks_clean() {
    need_clients();
    require_tool("qemu-io", "qemu-utils");
    let (dir, pki) = scratch_with_pki();
    let top = chain(dir.path());
    let s = TcpServed::new(
        &top,
        &[
            "--rw",
            "--tls-cert",
            pki.join("server-cert.pem").to_str().unwrap(),
            "--tls-key",
            pki.join("server-key.pem").to_str().unwrap(),
        ],
    );
    let creds = client_dir(&pki, "client", &["ca-cert.pem"]);
    // Large writes (many TLS records each) and small ones, read back.
    let mut io = Command::new("qemu-io");
    io.args(s.qemu_tls("disk", &creds));
    for c in [
        "write -P 0x5a 0 8M",
        "write -P 0x3c 12345 7000",
        "write -z 20M 2M",
        "flush",
        "read -P 0x5a 0 12345",
        "read -P 0x3c 12345 7000",
        "read -P 0x5a 19345 100000",
        "read -P 0 20M 2M",
    ] {
        io.arg("-c").arg(c);
    }
    let out = run(&mut io);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    s.stop();
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    qemu_io(
        "qcow2",
        &top,
        &["read -P 0x5a 0 12345", "read -P 0x3c 12345 7000"],
    );
}

#[test]
fn options_before_starttls_get_tls_reqd_and_export_name_hangs_up() {
    need_clients();
    let (_dir, pki, img) = pki_and_plain(7u8, 1 << 20);
    // TLS applies to Unix sockets too: the raw client speaks on one.
    let s = Served::new(&[&img], &["--tls-creds", pki.to_str().unwrap()]);
    let mut c = Raw::connect(&s.socket);
    c.send(&Wire::default().hello().0);
    for (opt, data) in [
        (3u32, Vec::new()),                                // LIST
        (8, Vec::new()),                                   // STRUCTURED_REPLY
        (7, Wire::default().go("plain").0[16..].to_vec()), // GO
        (6, Wire::default().go("plain").0[16..].to_vec()), // INFO
        (99, Vec::new()),                                  // unknown
    ] {
        c.send(&Wire::default().option(opt, &data).0);
        assert_eq!(
            c.option_replies(),
            vec![0x8000_0005],
            "option {opt} before TLS"
        );
    }
    // STARTTLS with a payload is malformed.
    c.send(&Wire::default().option(5, b"x").0);
    assert_eq!(c.option_replies(), vec![0x8000_0003]);
    // EXPORT_NAME cannot be refused by a reply: the server hangs up.
    c.send(&Wire::default().option(1, b"plain").0);
    assert!(c.closed(), "EXPORT_NAME before TLS was not refused");
    // A client that sends STARTTLS and then no TLS is dropped.
    let mut c = Raw::connect(&s.socket);
    c.send(&Wire::default().hello().option(5, &[]).0);
    assert_eq!(c.option_replies(), vec![1]);
    c.send(b"this is not a TLS ClientHello, but it is long enough to be read");
    assert!(c.closed(), "garbage after STARTTLS was not refused");
    // A client without fixed newstyle cannot start TLS: refused at once.
    let mut c = Raw::connect(&s.socket);
    c.send(&0u32.to_be_bytes());
    assert!(c.closed());
    // And the server still serves TLS clients (over the same socket).
    let creds = client_dir(&pki, "client", &["ca-cert.pem"]);
    let uri = format!(
        "nbds+unix:///plain?socket={}&tls-certificates={}&tls-hostname=localhost",
        s.socket.display(),
        creds.display()
    );
    let size = run(Command::new("nbdinfo").arg("--size").arg(uri));
    assert_eq!(size.trim(), "1048576");
}

#[test]
fn verify_peer_admits_only_clients_with_a_certificate_of_the_ca() {
    need_clients();
    let (dir, pki, img) = pki_and_plain(7u8, 1 << 20);
    let s = TcpServed::new(
        &img,
        &["--tls-creds", pki.to_str().unwrap(), "--tls-verify-peer"],
    );
    let anonymous = client_dir(&pki, "anon", &["ca-cert.pem"]);
    fails(nbdinfo_size(s.nbds("plain", &anonymous)));
    let full = client_dir(
        &pki,
        "full",
        &["ca-cert.pem", "client-cert.pem", "client-key.pem"],
    );
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(s.nbds("plain", &full)));
    assert_eq!(size.trim(), "1048576");
    let mut args: Vec<String> = vec!["info".into()];
    args.extend(s.qemu_tls("plain", &full));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let info = qemu_img(&args);
    assert!(info.contains("1048576"), "{info}");
    // A certificate from another CA is refused.
    let other = dir.path().join("other");
    make_pki(&other);
    let forged = client_dir(&other, "forged", &["client-cert.pem", "client-key.pem"]);
    std::fs::copy(pki.join("ca-cert.pem"), forged.join("ca-cert.pem")).unwrap();
    fails(nbdinfo_size(s.nbds("plain", &forged)));
    s.stop();
}

#[test]
fn bad_tls_files_are_one_line_errors_at_start() {
    require_tool("openssl", "openssl");
    let (dir, pki, img) = pki_and_plain(7u8, 4096);
    let p = |f: &str| pki.join(f).to_str().unwrap().to_string();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for (opts, names) in [
        (
            vec![
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                &p("server-key.pem"),
            ],
            "/nonexistent/c.pem",
        ),
        (
            vec![
                "--tls-cert",
                &p("server-key.pem"),
                "--tls-key",
                &p("server-key.pem"),
            ],
            "server-key.pem",
        ),
        (
            vec![
                "--tls-cert",
                &p("server-cert.pem"),
                "--tls-key",
                &p("server-cert.pem"),
            ],
            "server-cert.pem",
        ),
        (
            vec![
                "--tls-cert",
                &p("server-cert.pem"),
                "--tls-key",
                &p("client-key.pem"),
            ],
            "server-cert.pem",
        ),
        (
            vec!["--tls-creds", empty.to_str().unwrap()],
            "server-cert.pem",
        ),
        (
            vec!["--tls-creds", &p(""), "--tls-ca", &p("server-key.pem")],
            "server-key.pem",
        ),
    ] {
        let mut args = vec!["serve", "--listen", "tcp:127.0.0.1:0"];
        args.extend(opts.iter().copied());
        args.push(img.to_str().unwrap());
        let o = common::fuse::vdiskfs(&args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} started");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.contains(names) && e.contains("TLS"), "{args:?}: {e}");
    }
    // Verification without a CA is refused by name.
    common::fuse::assert_refused_with(
        &[
            "serve",
            "--tls-cert",
            &p("server-cert.pem"),
            "--tls-key",
            &p("server-key.pem"),
            "--tls-verify-peer",
            img.to_str().unwrap(),
        ],
        "--tls-ca",
    );
}

#[test]
fn mount_nbd_takes_the_allow_list_and_tls() {
    need_clients();
    let (dir, pki, img) = pki_and_plain(9u8, 1 << 20);
    let uri = |port: u16| format!("nbd://127.0.0.1:{port}/plain");
    // Refused by the allow-list, then admitted.
    for (allow, admitted) in [("10.0.0.0/8", false), ("127.0.0.1", true)] {
        let port = free_port();
        let listen = format!("tcp:127.0.0.1:{port}");
        let m = common::fuse::Mounted::new(&[&img], &["--nbd", &listen, "--allow", allow]);
        let o = nbdinfo_size(uri(port));
        assert_eq!(o.status.success(), admitted, "mount --nbd --allow {allow}");
        m.unmount();
    }
    // TLS: plaintext refused, TLS served, the FUSE file unchanged.
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let m = common::fuse::Mounted::new(
        &[&img],
        &["--nbd", &listen, "--tls-creds", pki.to_str().unwrap()],
    );
    fails(nbdinfo_size(uri(port)));
    let creds = client_dir(&pki, "client", &["ca-cert.pem"]);
    let out = dir.path().join("copy.raw");
    run(Command::new("nbdcopy")
        .arg(format!(
            "nbds://127.0.0.1:{port}/plain?tls-certificates={}",
            creds.display()
        ))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == vec![9u8; 1 << 20]);
    assert!(std::fs::read(m.file("plain.raw")).unwrap() == vec![9u8; 1 << 20]);
    let list = run(Command::new(common::fuse::bin()).arg("list"));
    assert!(list.contains(&format!("nbds://127.0.0.1:{port}")), "{list}");
    m.unmount();
    // --allow and --tls-* without --nbd are refused.
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    common::fuse::assert_refused_with(
        &[
            "mount",
            "--allow",
            "127.0.0.1",
            img.to_str().unwrap(),
            mp.to_str().unwrap(),
        ],
        "--nbd",
    );
}
