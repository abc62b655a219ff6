#!/usr/bin/env bash
# Builds the seed corpora in fuzz/corpus/<target>/: small images made with
# qemu-img/qemu-io covering each feature, plus the small images of
# ../shared/testdata. Run from the repository root or from fuzz/.
set -euo pipefail
cd "$(dirname "$0")"
shared=../../shared/testdata/images
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mk() { qemu-img create -q "$@"; }
io() { qemu-io "$@" >/dev/null; }

mk -f qcow2 -o cluster_size=512 "$tmp/c512.qcow2" 256k;      io -f qcow2 -c 'write -P 1 0 40k' -c 'write -z 64k 8k' "$tmp/c512.qcow2"
mk -f qcow2 -o cluster_size=4096 "$tmp/c4k.qcow2" 1M;        io -f qcow2 -c 'write -c -P 2 0 4k' -c 'write -P 3 8k 12k' "$tmp/c4k.qcow2"
mk -f qcow2 -o cluster_size=4096,compression_type=zstd "$tmp/zstd.qcow2" 1M; io -f qcow2 -c 'write -c -P 4 0 4k' "$tmp/zstd.qcow2"
mk -f qcow2 -o cluster_size=16384,extended_l2=on "$tmp/ext.qcow2" 1M; io -f qcow2 -c 'write -P 5 1k 3k' "$tmp/ext.qcow2"
mk -f qcow2 -o compat=0.10,cluster_size=4096 "$tmp/v2.qcow2" 1M; io -f qcow2 -c 'write -P 6 0 8k' "$tmp/v2.qcow2"
mk -f qcow2 -b c4k.qcow2 -F qcow2 -o cluster_size=4096 "$tmp/overlay.qcow2" 1M
mk -f qcow "$tmp/v1.qcow" 256k;                              io -f qcow -c 'write -P 7 0 8k' "$tmp/v1.qcow"
mk -f vmdk -o subformat=monolithicSparse "$tmp/sparse.vmdk" 1M; io -f vmdk -c 'write -P 8 0 64k' "$tmp/sparse.vmdk"
head -c 65536 /dev/urandom > "$tmp/data.raw"
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized "$tmp/data.raw" "$tmp/stream.vmdk"
mk -f vmdk -o subformat=monolithicFlat "$tmp/flat.vmdk" 64k
mk -f vpc "$tmp/dyn.vhd" 3M;                                 io -f vpc -c 'write -P 9 0 40k' "$tmp/dyn.vhd"
mk -f vpc -o subformat=fixed "$tmp/fixed.vhd" 256k
mk -f vhdx -o block_size=1M "$tmp/small.vhdx" 3M;            io -f vhdx -c 'write -P 9 0 1536k' -c 'write -z 2M 512k' "$tmp/small.vhdx"
mk -f vdi "$tmp/dyn.vdi" 4M;                                 io -f vdi -c 'write -P 9 1M 600k' "$tmp/dyn.vdi"
mk -f vdi -o static=on "$tmp/static.vdi" 1M
mk -f parallels -o cluster_size=4k "$tmp/p4k.hds" 256k;       io -f parallels -c 'write -P 10 8k 20k' "$tmp/p4k.hds"

seed() { local t=$1; shift; mkdir -p "corpus/$t"; for f in "$@"; do [ -f "$f" ] && cp "$f" "corpus/$t/"; done; true; }
small() { find "$shared" -type f -size -300k -name "$1" 2>/dev/null; }
seed qcow2_open "$tmp"/*.qcow2 $(small '*.qcow2')
seed qcow2_tables "$tmp"/*.qcow2 $(small '*.qcow2')
seed qcow_open "$tmp"/v1.qcow $(small '*.qcow')
seed vmdk_descriptor "$tmp/flat.vmdk" $(find "$shared" -name '*.vmdk' -size -4k)
seed vmdk_open "$tmp"/*.vmdk $(small '*.vmdk')
seed vmdk_read "$tmp"/sparse.vmdk "$tmp"/stream.vmdk $(small '*.vmdk')
seed vhd_open "$tmp"/*.vhd $(small '*.vhd')
seed vhdx_open "$tmp"/small.vhdx
seed vdi_open "$tmp"/*.vdi $(small '*.vdi')
seed parallels_open "$tmp"/*.hds $(small '*.hds')
seed chain_read "$tmp"/* $(small '*')
# write_paths: the first byte picks the format (0 qcow2, 1 qcow, 2 vmdk, 3 vhd, 4 vdi, 5 vhdx).
mkdir -p corpus/write_paths
for f in "$tmp"/c512.qcow2 "$tmp"/c4k.qcow2 "$tmp"/ext.qcow2 "$tmp"/v2.qcow2; do
  { printf '\x00'; cat "$f"; } > "corpus/write_paths/$(basename "$f")"; done
{ printf '\x01'; cat "$tmp/v1.qcow"; } > corpus/write_paths/v1.qcow
{ printf '\x02'; cat "$tmp/sparse.vmdk"; } > corpus/write_paths/sparse.vmdk
for f in "$tmp"/dyn.vhd "$tmp"/fixed.vhd; do
  { printf '\x03'; cat "$f"; } > "corpus/write_paths/$(basename "$f")"; done
for f in "$tmp"/dyn.vdi "$tmp"/static.vdi; do
  { printf '\x04'; cat "$f"; } > "corpus/write_paths/$(basename "$f")"; done
{ printf '\x05'; cat "$tmp/small.vhdx"; } > corpus/write_paths/small.vhdx
mkdir -p corpus/decompress
python3 - <<'PY'
import os, zlib
d = "corpus/decompress"
for i, data in enumerate([b"a" * 4096, os.urandom(512) * 8, bytes(range(256)) * 16]):
    raw = zlib.compressobj(6, zlib.DEFLATED, -15); c = raw.compress(data) + raw.flush()
    open(f"{d}/deflate{i}", "wb").write(bytes([3]) + c)
    open(f"{d}/zlib{i}", "wb").write(bytes([4]) + zlib.compress(data))
PY
# nbd_client: well-formed client sessions (handshake, options, requests).
mkdir -p corpus/nbd_client
python3 - <<'PY'
import struct
def opt(o, d=b""): return b"IHAVEOPT" + struct.pack(">II", o, len(d)) + d
def s(x): return struct.pack(">I", len(x)) + x
def go(e): return opt(7, s(e) + struct.pack(">HH", 1, 3))
def meta(e, qs): return opt(10, s(e) + struct.pack(">I", len(qs)) + b"".join(s(q) for q in qs))
def req(f, t, c, o, n, d=b""): return struct.pack(">IHHQQI", 0x25609513, f, t, c, o, n) + d
hello = struct.pack(">I", 3)
sessions = {
    "list": hello + opt(3) + opt(2),
    "read": hello + go(b"ro") + req(0, 0, 1, 0, 4096) + req(0, 2, 2, 0, 0),
    "structured": hello + opt(8) + meta(b"rw", [b"base:allocation", b"qemu:allocation-depth"]) + go(b"rw")
        + req(0, 7, 1, 0, 1 << 20) + req(1, 1, 2, 512, 512, b"x" * 512) + req(2, 6, 3, 0, 65536)
        + req(0, 4, 4, 4096, 4096) + req(0, 3, 5, 0, 0) + req(0, 0, 6, 0, 8192),
    "oldstyle": hello + opt(1, b"ro") + req(0, 0, 1, 100, 100),
}
for name, data in sessions.items():
    open(f"corpus/nbd_client/{name}", "wb").write(data)
PY
echo "seeds: $(find corpus -type f | wc -l) files in $(ls corpus | wc -l) corpora"
