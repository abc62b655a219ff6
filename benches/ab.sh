#!/usr/bin/env bash
# A/B of two vdiskfs builds on one workload, alternating A and B in pairs
# (so both meet the same load on a shared machine); prints each pair and
# the geometric mean of the B/A ratios. Needs root.
#
#   benches/ab.sh A_BINARY B_BINARY IMAGE [ROUNDS [MOUNT_OPTS...]]
#
# Workload (env WORKLOAD): seqread (default; fio 1 MiB psync buffered, cold
# caches, first SIZE, default 1G), seqwrite-buf (fio 1 MiB psync buffered
# writes + fsync), randwrite-buf (4 KiB buffered random writes + fsync),
# randread-qd32 (fio 4 KiB random reads, libaio O_DIRECT, queue depth 32,
# 5 s over the first SIZE, cold caches; prints IOPS).
# Writes go to a fresh copy of IMAGE for every run (`--rw`), or with
# OVERLAY=1 to a fresh `--overlay` file over IMAGE (never written).
set -uo pipefail
A=${1:?A binary} B=${2:?B binary} IMG=${3:?image} ROUNDS=${4:-3}
shift $(($# < 4 ? $# : 4))
WORKLOAD=${WORKLOAD:-seqread} SIZE=${SIZE:-1G}
WORK=$(mktemp -d /tmp/ab.XXXXXX)
MP="$WORK/mnt"
mkdir -p "$MP"
trap 'umount -l "$MP" 2>/dev/null; rm -rf "$WORK"' EXIT
one() { # BINARY -> prints MiB/s or IOPS
	local bin=$1 src=$IMG args=() t0 t1
	shift
	if [ "$WORKLOAD" != seqread ] && [ -n "${OVERLAY:-}" ]; then
		rm -f "$WORK/overlay.qcow2"
		args=(--overlay "$WORK/overlay.qcow2")
	elif [ "$WORKLOAD" != seqread ]; then
		src="$WORK/copy.${IMG##*.}"
		cp --reflink=auto "$IMG" "$src" || return 1
		args=(--rw)
	fi
	"$bin" mount "$@" "${args[@]}" "$src" "$MP" || return 1
	local f
	f=$(ls "$MP"/*.raw | head -1)
	sync
	echo 3 >/proc/sys/vm/drop_caches
	t0=$(date +%s.%N)
	case "$WORKLOAD" in
	seqread) fio --name=ab --filename="$f" --readonly --rw=read --bs=1M --ioengine=psync \
		--direct=0 --size="$SIZE" --output=/dev/null >/dev/null 2>&1 ;;
	seqwrite-buf) fio --name=ab --filename="$f" --rw=write --bs=1M --ioengine=psync \
		--direct=0 --size="$SIZE" --end_fsync=1 --output=/dev/null >/dev/null 2>&1 ;;
	randread-qd32) fio --name=ab --filename="$f" --readonly --rw=randread --bs=4k --ioengine=libaio \
		--iodepth=32 --direct=1 --size="$SIZE" --time_based --runtime=5 --randseed=7 \
		--output-format=json --output="$WORK/fio.json" >/dev/null 2>&1 ;;
	randwrite-buf) fio --name=ab --filename="$f" --rw=randwrite --bs=4k --ioengine=psync \
		--direct=0 --io_size="$SIZE" --end_fsync=1 --output=/dev/null >/dev/null 2>&1 ;;
	esac
	t1=$(date +%s.%N)
	"$bin" unmount "$MP" >/dev/null 2>&1 || umount -l "$MP"
	rm -f "$WORK/copy."* "$WORK/overlay.qcow2"
	local bytes
	bytes=$(numfmt --from=iec "$SIZE")
	if [ "$WORKLOAD" = randread-qd32 ]; then
		python3 -c "import json; print(f'{json.load(open(\"$WORK/fio.json\"))[\"jobs\"][0][\"read\"][\"iops\"]:.0f}')"
	elif [ "$WORKLOAD" = randwrite-buf ]; then
		python3 -c "print(f'{$bytes / 4096 / ($t1 - $t0):.0f}')"
	else
		python3 -c "print(f'{$bytes / 1048576 / ($t1 - $t0):.1f}')"
	fi
}
ratios=()
for ((r = 1; r <= ROUNDS; r++)); do
	if [ $((r % 2)) = 1 ]; then
		a=$(one "$A" "$@") b=$(one "$B" "$@")
	else
		b=$(one "$B" "$@") a=$(one "$A" "$@")
	fi
	echo "round $r: A $a  B $b  B/A $(python3 -c "print(f'{$b / $a:.2f}')")"
	ratios+=("$b/$a")
done
python3 -c "
import math; r=[eval(x) for x in '${ratios[*]}'.split()]
print(f'geometric mean B/A over {len(r)} rounds: {math.exp(sum(map(math.log, r)) / len(r)):.2f}')"
