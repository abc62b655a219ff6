//! Remote images (issue 18): images read from a real S3-compatible server
//! (moto, started here) and from a Range-capable HTTP server (a small one in
//! tests/suite/common/httpd.rs), through the library and through FUSE.
//! Byte-exact against the manifest's sha256 and qemu-img; chains across
//! objects; untrusted prefixes; ETag changes; dead servers; bad credentials.

use crate::common;
use crate::common::httpd;
use common::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::fuse::{vdiskfs, Mounted};
use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::policy::OpenPolicy;

const BUCKET: &str = "vdiskfs-test";
const KEY_ID: &str = "AKIDVDISKFSTEST";
const SECRET: &str = "sEcReT-vdiskfs-do-not-print";

/// The process's remote client for this test (see
/// [`httpd::remote_client`]), with timeouts short enough for tests.
fn client() -> std::sync::MutexGuard<'static, ()> {
    httpd::remote_client(vdiskfs::remote::Settings {
        chunk: 1 << 20,
        cache_bytes: 64 << 20,
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        max_retries: 2,
        retry_timeout: Duration::from_secs(6),
        ..Default::default()
    })
}

fn venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin")
}

/// Starts moto_server on a free port (dies with this process); `auth`
/// makes it check credentials from the first request on.
fn start_moto(auth: bool) -> (Child, u16) {
    let bin = venv().join("moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup.sh (it installs moto[server] from PyPI into \
         target/moto-venv); this test does not skip",
        bin.display()
    );
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if auth {
        cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
    }
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; the server dies with us.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("cannot start moto_server");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, port)
}

/// The test process's moto, its bucket filled with the testdata images
/// and a chain; the AWS_* variables pointed at it.
fn moto() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        // PR_SET_PDEATHSIG fires when the spawning *thread* ends: spawn the
        // shared server from a thread that lives as long as the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (child, port) = start_moto(false);
            tx.send(port).unwrap();
            let _keep = child;
            loop {
                std::thread::park();
            }
        });
        let port = rx.recv().expect("moto_server did not start");
        // SAFETY (edition 2021: safe): set once, before any S3 client exists.
        std::env::set_var("AWS_ACCESS_KEY_ID", KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        let images = common::testdata().join("images");
        let chain = chain_dir();
        upload(
            port,
            &[
                (images.as_path(), "manifest"),
                (chain.path(), "chain"),
                (chain.path(), "other"),
            ],
        );
        std::mem::forget(chain);
        port
    })
}

/// Creates the bucket and uploads each directory tree under its prefix (boto3).
fn upload(port: u16, trees: &[(&Path, &str)]) {
    let script = r#"
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="x", aws_secret_access_key="x")
try:
    s3.create_bucket(Bucket=sys.argv[2])
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
args = sys.argv[3:]
for root, prefix in zip(args[::2], args[1::2]):
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            s3.upload_file(p, sys.argv[2], prefix + "/" + os.path.relpath(p, root))
"#;
    let mut cmd = Command::new(venv().join("python3"));
    cmd.arg("-c")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(BUCKET);
    for (dir, prefix) in trees {
        cmd.arg(dir).arg(prefix);
    }
    common::run(&mut cmd);
}

/// A scratch directory with `base.raw` (3 MiB of patterned data) and
/// `top.qcow2` over it (relative backing name), some clusters rewritten.
fn chain_dir() -> tempfile::TempDir {
    let dir = common::scratch();
    let base = dir.path().join("base.raw");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    let top = dir.path().join("top.qcow2");
    common::qemu_img_line(&format!(
        "create -q -f qcow2 -b base.raw -F raw {}",
        top.to_str().unwrap()
    ));
    common::qemu_io(
        "qcow2",
        &top,
        &["write -P 0x5a 64k 128k", "write -P 0xa5 2M 4k"],
    );
    dir
}

/// Opens `url` in this process; the caller holds [`client`].
fn open(url: &str, untrusted: bool) -> vdiskfs::Result<Chain> {
    let opts = ChainOptions {
        policy: OpenPolicy {
            untrusted,
            ..Default::default()
        },
        ..Default::default()
    };
    Chain::open(Path::new(url), &opts, &common::caches())
}

/// The MANIFEST.tsv rows of the formats the S3 tests serve.
fn manifest_rows() -> Vec<common::manifest::Row> {
    common::manifest::rows(common::manifest::MANIFEST)
        .into_iter()
        .filter(|r| ["qcow2", "qcow", "vmdk", "raw", "-"].contains(&r.format.as_str()))
        .collect()
}

#[test]
fn every_manifest_image_reads_byte_exact_from_s3() {
    let _client = client();
    moto();
    let mut failures = Vec::new();
    for row in manifest_rows() {
        let url = format!("s3://{BUCKET}/manifest/{}", row.file);
        match (open(&url, false), row.want.sha()) {
            (Ok(chain), Some(sha)) => match common::sha256_chain(&chain) {
                Ok(got) if got == sha => {}
                Ok(got) => failures.push(format!("{url}: sha256 {got} != {sha}")),
                Err(e) => failures.push(format!("{url}: read failed: {e}")),
            },
            (Ok(_), None) => failures.push(format!("{url}: opened but must be refused")),
            (Err(e), None) => {
                let msg = e.to_string();
                if msg.contains('\n') || !msg.contains("s3://") {
                    failures.push(format!("{url}: error not one line naming the URL: {msg}"));
                }
            }
            (Err(e), Some(_)) => failures.push(format!("{url}: cannot open: {e}")),
        }
    }
    let st = vdiskfs::remote::stats();
    assert!(st.requests > 0 && st.fetched > 0, "{st:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_chain_across_objects_resolves_relative_to_the_url() {
    let _client = client();
    moto();
    let local = chain_dir();
    let expected = common::qemu_raw(&local.path().join("top.qcow2"), Some("qcow2"));
    let chain = open(&format!("s3://{BUCKET}/chain/top.qcow2"), true).unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(
        chain.layers()[1].path(),
        Path::new(&format!("s3://{BUCKET}/chain/base.raw"))
    );
    let got = common::read_all(&chain, 300_000).unwrap();
    common::assert_same(&got, &expected, Path::new("s3 chain"), 300_000);

    let server = httpd::Httpd::start(local.path());
    let chain = open(&server.url("top.qcow2"), true).unwrap();
    let got = common::read_all(&chain, 1 << 20).unwrap();
    common::assert_same(&got, &expected, Path::new("http chain"), 1 << 20);
}

#[test]
fn untrusted_mode_refuses_a_backing_file_in_another_prefix() {
    let _client = client();
    moto();
    let dir = common::scratch();
    let top = dir.path().join("escape.qcow2");
    common::qemu_img_line(&format!(
        "create -q -f qcow2 -u -b ../other/base.raw -F raw {} 3M",
        top.to_str().unwrap()
    ));
    upload(moto(), &[(dir.path(), "nest")]);
    let url = format!("s3://{BUCKET}/nest/escape.qcow2");
    let err = open(&url, true).err().expect("untrusted mode must refuse");
    assert_eq!(err.kind(), vdiskfs::ErrorKind::Policy, "{err}");
    assert!(err.to_string().contains("untrusted"), "{err}");
    // Trusted, the same name resolves inside the bucket and opens.
    let chain = open(&url, false).unwrap();
    assert_eq!(
        chain.layers()[1].path(),
        Path::new(&format!("s3://{BUCKET}/other/base.raw"))
    );
}

#[test]
fn a_replaced_object_fails_reads_with_a_clear_error() {
    let _client = client();
    let dir = common::scratch();
    let p = dir.path().join("disk.raw");
    std::fs::write(&p, vec![1u8; 8 << 20]).unwrap();
    let server = httpd::Httpd::start(dir.path());
    let url = server.url("disk.raw");
    let chain = open(&url, false).unwrap();
    let mut buf = vec![0u8; 4096];
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(dir.path().join("new"), vec![2u8; 8 << 20]).unwrap();
    std::fs::rename(dir.path().join("new"), &p).unwrap();
    let err = chain
        .read_at(&mut buf, 6 << 20)
        .expect_err("reading a replaced object must fail");
    let msg = err.to_string();
    assert!(msg.contains("changed") && msg.contains(&url), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn a_dead_server_gives_eio_in_bounded_time_then_recovers() {
    let _client = client();
    let dir = common::scratch();
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("d.raw"), &data).unwrap();
    let server = httpd::Httpd::start(dir.path());
    let chain = open(&server.url("d.raw"), false).unwrap();
    let mut buf = vec![0u8; 65536];
    chain.read_at(&mut buf, 0).unwrap();
    for (what, switch) in [("stalled", &server.ctl.stall), ("down", &server.ctl.down)] {
        switch.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let at = if what == "stalled" { 5 << 20 } else { 9 << 20 };
        let err = chain
            .read_at(&mut buf, at)
            .expect_err("a read from a dead server must fail");
        assert_eq!(err.kind(), vdiskfs::ErrorKind::Io, "{what}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert!(!err.to_string().contains('\n'), "{err}");
        switch.store(false, Ordering::Relaxed);
        chain.read_at(&mut buf, at).unwrap();
        assert_eq!(buf, data[at as usize..at as usize + buf.len()], "{what}");
    }
}

#[test]
fn sequential_reads_prefetch_and_random_reads_stay_small() {
    let _client = client();
    let dir = common::scratch();
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 241) as u8).collect();
    std::fs::write(dir.path().join("s.raw"), &data).unwrap();
    let server = httpd::Httpd::start(dir.path());
    let chain = open(&server.url("s.raw"), false).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    for off in (0..16u64 << 20).step_by(buf.len()) {
        chain.read_at(&mut buf, off).unwrap();
        assert_eq!(buf, data[off as usize..off as usize + buf.len()]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let requests = server.ctl.requests.load(Ordering::Relaxed);
    // 16 MiB in 1 MiB chunks: the window must have run ahead of the reader.
    assert!(
        server.ctl.sent.load(Ordering::Relaxed) > 17 << 20,
        "no read-ahead: {} bytes sent",
        server.ctl.sent.load(Ordering::Relaxed)
    );
    assert!(
        requests < 16,
        "{requests} requests for 16 chunks: not coalesced"
    );
}

#[test]
fn fuse_mounts_from_s3_and_http_and_info_on_urls() {
    moto();
    let local = chain_dir();
    let expected = common::sha256_hex(&common::qemu_raw(
        &local.path().join("top.qcow2"),
        Some("qcow2"),
    ));
    let s3 = format!("s3://{BUCKET}/chain/top.qcow2");
    let server = httpd::Httpd::start(local.path());
    let http = server.url("top.qcow2");
    for url in [&s3, &http] {
        let m = Mounted::new(&[Path::new(url)], &["--remote-chunk", "256K"]);
        assert_eq!(common::sha256_file(&m.file("top.raw")), expected, "{url}");
        let list = vdiskfs(&["list", "--json"]);
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(text.contains(url.as_str()), "{text}");
        assert!(!text.contains(SECRET) && !text.contains(KEY_ID), "{text}");
        m.unmount();
        let info = vdiskfs(&["info", "--json", url]);
        assert!(info.status.success(), "{info:?}");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual_size"], 3 << 20);
        assert_eq!(v["chain_length"], 2);
        assert!(v["chain"][0]["e_tag"].is_string(), "{v}");
    }
    let empty = common::scratch();
    let out = vdiskfs(&["mount", "--rw", &http, empty.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--overlay"), "{err}");
    let out = vdiskfs(&["info", &server.url("missing.qcow2")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("404") && err.contains("missing.qcow2"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn wrong_credentials_give_a_one_line_403_at_mount() {
    let (mut child, port) = start_moto(true);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::fuse::bin())
        .args(["mount", &format!("s3://{BUCKET}/x.qcow2")])
        .arg(dir.path())
        .env("AWS_ACCESS_KEY_ID", "AKIDWRONG")
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("403") && err.contains("s3://"), "{err}");
    assert!(!err.contains("wrong-secret-value"), "{err}");
}

#[test]
fn aws_profiles_and_mount_options_configure_s3() {
    let port = moto();
    let aws = common::scratch();
    let creds = aws.path().join("credentials");
    let config = aws.path().join("config");
    std::fs::write(
        &creds,
        format!("[test]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile test]\nregion = us-east-1\nendpoint_url = http://127.0.0.1:{port}\n\
             [profile sso]\nsso_session = corp\n"
        ),
    )
    .unwrap();
    let url = format!("s3://{BUCKET}/chain/top.qcow2");
    // Nothing in the environment but the files: the profile's keys,
    // region and endpoint (plain http allowed by an option).
    let mount = |opts: &[&str]| {
        let mp = tempfile::tempdir().unwrap();
        let out = Command::new(common::fuse::bin())
            .arg("mount")
            .args(opts)
            .arg(&url)
            .arg(mp.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_REGION")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ALLOW_HTTP")
            .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
            .env("AWS_CONFIG_FILE", &config)
            .output()
            .unwrap();
        if out.status.success() {
            let data = std::fs::read(mp.path().join("top.raw")).unwrap();
            let un = vdiskfs(&["unmount", mp.path().to_str().unwrap()]);
            assert!(un.status.success(), "{un:?}");
            assert_eq!(data.len(), 3 << 20);
        }
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert_eq!(mount(&["-o", "aws_profile=test,aws_allow_http"]), "");
    assert_eq!(mount(&["--aws-profile", "test", "--aws-allow-http"]), "");
    let err = mount(&["-o", "aws_profile=nope"]);
    assert!(
        err.contains("\"nope\"") && err.trim().lines().count() == 1,
        "{err}"
    );
    let err = mount(&["-o", "aws_profile=sso"]);
    assert!(err.contains("export-credentials"), "{err}");
    let err = mount(&[
        "-o",
        &format!("aws_profile=test,aws_secret_access_key={SECRET}"),
    ]);
    assert!(
        err.contains("not mount options") && !err.contains(SECRET),
        "{err}"
    );
    // Without the option, plain http to the profile's endpoint is refused.
    let err = mount(&["-o", "aws_profile=test"]);
    assert!(!err.is_empty() && err.trim().lines().count() == 1, "{err}");
}
