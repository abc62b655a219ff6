#!/usr/bin/env bash
# Opening a remote chain (issue 18): top.qcow2 -> mid.qcow2 -> base.vmdk
# (16 GiB monolithicSparse, 1 MiB of grain tables), served over HTTP on
# loopback by benches/remote_httpd.py, which sleeps DELAY ms (default 20)
# before every answer and counts sequential rounds (requests arriving while
# no other is being served). For the default 4 MiB chunks and for 64 KiB
# chunks (tables then lie outside the first chunk, as in larger images):
# the time of `vdiskfs mount URL` (the command opens the chain to check it,
# then the daemon opens it again) and of reading the first 4 KiB of the
# raw view, with the rounds and requests of each. ROUNDS=n repeats (default
# 3). BIN=path runs another build (the "before" figures). Needs root (FUSE),
# curl, qemu-img, python3. Results: docs/performance.md, "Remote images".
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
bench_init remote_chain 18619 curl qemu-img qemu-io python3 bc
mkdir -p "$W/srv" "$W/mnt"
cd "$W/srv"
qemu-img create -q -f vmdk base.vmdk 16G
qemu-io -f vmdk -c "write -P 0x11 0 1M" -c "write -P 0x12 8G 64k" base.vmdk > /dev/null
qemu-img create -q -f qcow2 -b base.vmdk -F vmdk mid.qcow2
qemu-io -f qcow2 -c "write -P 0x22 512k 64k" mid.qcow2 > /dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c "write -P 0x33 2M 4k" top.qcow2 > /dev/null
cd - > /dev/null
python3 benches/remote_httpd.py "$W/srv" "$PORT" "$DELAY" &
SRV=$!
URL=http://127.0.0.1:$PORT
for _ in $(seq 100); do curl -s -o /dev/null "$URL/__stats" && break; sleep 0.1; done
stat() { curl -s "$URL/__stats" | cut -d' ' -f"$1"; }
now() { date +%s.%N; }
ms() { echo "($2 - $1) * 1000 / 1" | bc; }
for chunk in 4M 64K; do
  for _ in $(seq "${ROUNDS:-3}"); do
    q0=$(stat 2); r0=$(stat 3); t0=$(now)
    "$BIN" mount --remote-chunk $chunk "$URL/top.qcow2" "$W/mnt"
    t1=$(now); q1=$(stat 2); r1=$(stat 3)
    head -c 4096 "$W/mnt/top.raw" > /dev/null
    t2=$(now); q2=$(stat 2); r2=$(stat 3)
    "$BIN" unmount "$W/mnt"
    echo "chunk $chunk: mount $(ms $t0 $t1) ms, $((r1 - r0)) rounds, $((q1 - q0)) requests;" \
      "first 4 KiB $(ms $t1 $t2) ms, $((r2 - r1)) rounds, $((q2 - q1)) requests"
  done
done
