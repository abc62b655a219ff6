#!/usr/bin/env bash
# Remote images (issue 18) with an injected round-trip delay: a 512 MiB ext4
# guest disk (qcow2) holding a 64 MiB file, served over HTTP on loopback by
# benches/remote_httpd.py, which sleeps DELAY ms (default 20) before every
# answer. Times, each from a cold start:
#   vdiskfs   mount the URL + fdisk -l + read the 64 MiB file (debugfs dump)
#   download  fetch the whole image (curl) + the same on the local copy
#   qemu-curl qemu-img convert from qemu's curl driver + the same on the raw copy
# then sequential throughput of a raw image with prefetch on and off, and the
# bytes the server sent against the bytes read; the same vdiskfs run with an
# on-disk cache (--remote-cache) cold and warm; the mount time of a three-link
# chain. BIN=path runs another build of vdiskfs. Needs root (FUSE), curl,
# debugfs, fdisk, and qemu-block-extra (the curl driver) matching qemu-utils.
# Results: docs/performance.md, "Remote images".
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_init remote 18618 curl debugfs fdisk mkfs.ext4 qemu-img python3
[ -x "$BIN" ] || cargo build --release --quiet
sent() { curl -s "$URL/__stats" | cut -d' ' -f1; }
reqs() { curl -s "$URL/__stats" | cut -d' ' -f2; }

mkdir -p "$W/root" "$W/srv" "$W/mnt" "$W/mnt2"
head -c 64M /dev/urandom > "$W/root/big.bin"
want=$(sha256sum < "$W/root/big.bin" | cut -d' ' -f1)
truncate -s 512M "$W/fs.raw"
mkfs.ext4 -q -d "$W/root" "$W/fs.raw"
qemu-img convert -f raw -O qcow2 "$W/fs.raw" "$W/srv/disk.qcow2"
truncate -s 256M "$W/srv/seq.raw"
head -c 256M /dev/urandom > "$W/srv/seq.raw"
rm -rf "$W/root"
mkdir -p "$W/srv/chain"
truncate -s 1G "$W/srv/chain/base.raw"
qemu-img create -q -f qcow2 -b base.raw -F raw "$W/srv/chain/mid.qcow2"
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$W/srv/chain/top.qcow2"

python3 benches/remote_httpd.py "$W/srv" "$PORT" "$DELAY" &
SRV=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/__stats" && break; sleep 0.1; done
URL=http://127.0.0.1:$PORT
now() { date +%s.%N; }
el() { echo "$2 - $1" | bc; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

check() { # disk.raw-like file: fdisk, then dump and check the 64 MiB file
  fdisk -l "$1" > /dev/null
  debugfs -R "dump /big.bin $W/out.bin" "$1" 2>/dev/null
  got=$(sha256sum < "$W/out.bin" | cut -d' ' -f1); rm -f "$W/out.bin"
  [ "$got" = "$want" ] || { echo "remote.sh: wrong data read from $1" >&2; exit 1; }
}

drop; s0=$(sent); t0=$(now)
"$BIN" mount "$URL/disk.qcow2" "$W/mnt"
check "$W/mnt/disk.raw"
"$BIN" unmount "$W/mnt"
t1=$(now); s1=$(sent)
echo "vdiskfs mount URL + fdisk + read 64 MiB: $(el $t0 $t1) s, server sent $(( (s1 - s0) >> 20 )) MiB"

for pass in cold warm; do
  drop; s0=$(sent); r0=$(reqs); t0=$(now)
  "$BIN" mount --remote-cache "$W/rcache" "$URL/disk.qcow2" "$W/mnt"
  check "$W/mnt/disk.raw"
  "$BIN" unmount "$W/mnt"
  t1=$(now); s1=$(sent); r1=$(reqs)
  echo "the same with --remote-cache ($pass): $(el $t0 $t1) s, server sent $(( (s1 - s0) >> 20 )) MiB in $((r1 - r0)) requests"
done

for i in 1 2 3; do
  r0=$(reqs); t0=$(now)
  "$BIN" mount "$URL/chain/top.qcow2" "$W/mnt"
  head -c 4096 "$W/mnt/top.raw" > /dev/null
  t1=$(now); r1=$(reqs)
  "$BIN" unmount "$W/mnt"
  echo "mount a 3-link chain (qcow2, qcow2, raw) + read 4 KiB: $(el $t0 $t1) s, $((r1 - r0)) requests"
done

drop; t0=$(now)
curl -s -o "$W/dl.qcow2" "$URL/disk.qcow2"
"$BIN" mount "$W/dl.qcow2" "$W/mnt"
check "$W/mnt/dl.raw"
"$BIN" unmount "$W/mnt"
t1=$(now); rm -f "$W/dl.qcow2"
echo "download image + mount + fdisk + read 64 MiB: $(el $t0 $t1) s"

drop; t0=$(now)
if timeout "${QEMU_TIMEOUT:-120}" qemu-img convert -O raw \
  "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"http\",\"url\":\"$URL/disk.qcow2\"}}" "$W/q.raw"; then
  check "$W/q.raw"
  t1=$(now)
  echo "qemu-img convert (curl driver) + fdisk + read 64 MiB: $(el $t0 $t1) s"
else
  echo "qemu-img convert (curl driver): did not finish within ${QEMU_TIMEOUT:-120} s"
fi
rm -f "$W/q.raw"

for ra in 64M 0; do
  drop; s0=$(sent); t0=$(now)
  "$BIN" mount --remote-readahead $ra "$URL/seq.raw" "$W/mnt2"
  dd if="$W/mnt2/seq.raw" of=/dev/null bs=1M status=none
  "$BIN" unmount "$W/mnt2"
  t1=$(now); s1=$(sent)
  echo "sequential 256 MiB, readahead $ra: $(echo "256 / ($t1 - $t0)" | bc -l | cut -c1-6) MiB/s, server sent $(( (s1 - s0) >> 20 )) MiB"
done
