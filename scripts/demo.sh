#!/usr/bin/env bash
# The main job in one command: set up, mount the sample qcow2 the repository
# ships, look inside the guest disk with ordinary tools, and unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin=target/release/vdiskfs
image=tests/data/sample.qcow2
mnt=$(mktemp -d /tmp/vdiskfs-demo.XXXXXX)
oracle=$(mktemp /tmp/vdiskfs-demo-oracle.XXXXXX)
trap '$bin unmount "$mnt" 2>/dev/null || true; rmdir "$mnt"; rm -f "$oracle"' EXIT

set -x
$bin info "$image"
$bin mount "$image" "$mnt"
ls -l "$mnt"
$bin list
sha256sum "$mnt/sample.raw"
qemu-img convert -O raw "$image" "$oracle" && sha256sum "$oracle"   # the same, by qemu
debugfs -R 'cat /hello.txt' "$mnt/sample.raw" 2>/dev/null
$bin unmount "$mnt"
