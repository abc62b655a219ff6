#!/usr/bin/env bash
# NBD benchmark: `vdiskfs serve` against `qemu-nbd` on the same images,
# with the same clients, in one invocation, runs paired (the two servers
# alternate, order flipped every round) and the ratio taken per pair.
#
#   [IMAGES="qcow2 chain"] benches/nbd.sh [--size MIB] [--rounds N] [--runtime S] [--out DIR]
#
# Throughput: `nbdcopy URI null:` (whole disk, 4 connections, block status
# on, so holes are skipped the same way by both). IOPS: 4 KiB random reads
# at QD32 with fio (libaio, O_DIRECT) on an nbdfuse mount of the export.
# Needs qemu-img, qemu-io, qemu-nbd, nbdcopy (libnbd-bin), nbdfuse, fio.
set -euo pipefail
cd "$(dirname "$0")/.."
size=512 rounds=2 runtime=5 out=bench-results/nbd
while (($#)); do
	case $1 in
	--size) size=$2; shift 2 ;;
	--rounds) rounds=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	*) echo "usage: benches/nbd.sh [--size MIB] [--rounds N] [--runtime S] [--out DIR]" >&2; exit 2 ;;
	esac
done
for t in qemu-img qemu-io qemu-nbd nbdcopy nbdfuse fio; do
	command -v $t >/dev/null || { echo "nbd.sh: $t is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
cargo build --release --quiet
bin=$PWD/target/release/vdiskfs
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
	for m in "$work"/mnt*; do umount "$m" 2>/dev/null || true; done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT

# Images: random data (incompressible), made once per size.
img=$out/images-$size
mkdir -p "$img"
if [ ! -f "$img/qcow2.qcow2" ]; then
	head -c $((size << 20)) /dev/urandom >"$img/data.raw"
	qemu-img convert -q -f raw -O qcow2 "$img/data.raw" "$img/qcow2.qcow2"
	qemu-img convert -q -f raw -O qcow2 -c "$img/data.raw" "$img/qcow2-comp.qcow2"
	qemu-img convert -q -f raw -O vmdk -o subformat=monolithicSparse "$img/data.raw" "$img/vmdk.vmdk"
	# A chain: half the data in the base, a quarter rewritten in the top.
	qemu-img create -q -f qcow2 "$img/base.qcow2" ${size}M
	qemu-io -f qcow2 -c "write -P 1 0 $((size / 2))M" "$img/base.qcow2" >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$img/chain.qcow2"
	qemu-io -f qcow2 -c "write -P 2 $((size / 4))M $((size / 4))M" "$img/chain.qcow2" >/dev/null
	rm -f "$img/data.raw"
fi

# start SERVER IMAGE FMT -> socket path in $sock
start() {
	local server=$1 image=$2 fmt=$3
	sock=$work/$server.sock
	rm -f "$sock"
	if [ "$server" = vdiskfs ]; then
		"$bin" serve --listen "unix:$sock" "$image" 2>/dev/null &
	else
		qemu-nbd -t -r -A -f "$fmt" -x "$(basename "${image%.*}")" -k "$sock" "$image" 2>/dev/null &
	fi
	pids+=($!)
	spid=$!
	for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
}
stop() { kill "$spid"; wait "$spid" 2>/dev/null || true; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

copy_secs() { # URI
	local t0 t1
	t0=$(date +%s.%N)
	nbdcopy --connections 4 "$1" null:
	t1=$(date +%s.%N)
	echo "$t1 - $t0" | bc -l
}

rand_iops() { # URI
	local mnt=$work/mnt
	mkdir -p "$mnt"
	nbdfuse -r "$mnt" --uri "$1" &
	local fpid=$!
	for _ in $(seq 200); do [ -s "$mnt/nbd" ] && break; sleep 0.05; done
	fio --name=r --filename="$mnt/nbd" --rw=randread --bs=4k --iodepth=32 --ioengine=libaio \
		--direct=1 --time_based --runtime="$runtime" --output-format=json 2>/dev/null |
		python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
	umount "$mnt"
	wait "$fpid" 2>/dev/null || true
}

results=$out/results-$(date -u +%Y%m%dT%H%M%S).tsv
printf 'image\tmetric\tround\tvdiskfs\tqemu-nbd\tratio\n' | tee "$results"
for name in ${IMAGES:-qcow2 qcow2-comp vmdk chain}; do
	case $name in
	qcow2-comp) image=$img/qcow2-comp.qcow2 fmt=qcow2 ;;
	vmdk) image=$img/vmdk.vmdk fmt=vmdk ;;
	*) image=$img/$name.qcow2 fmt=qcow2 ;;
	esac
	export_name=$(basename "${image%.*}")
	for metric in copy-MBps randread-iops; do
		for r in $(seq "$rounds"); do
			order=(vdiskfs qemu-nbd)
			((r % 2 == 0)) && order=(qemu-nbd vdiskfs)
			declare -A v=()
			for server in "${order[@]}"; do
				start "$server" "$image" "$fmt"
				uri="nbd+unix:///$export_name?socket=$sock"
				drop
				if [ "$metric" = copy-MBps ]; then
					s=$(copy_secs "$uri")
					v[$server]=$(echo "$size / $s" | bc -l | xargs printf '%.0f')
				else
					v[$server]=$(rand_iops "$uri")
				fi
				stop
			done
			ratio=$(echo "${v[vdiskfs]} / ${v[qemu-nbd]}" | bc -l | xargs printf '%.2f')
			printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$metric" "$r" "${v[vdiskfs]}" "${v[qemu-nbd]}" "$ratio" | tee -a "$results"
		done
	done
done
echo "results: $results"
