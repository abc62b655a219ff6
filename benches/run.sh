#!/usr/bin/env bash
# End-to-end benchmark: vdiskfs against qemu-storage-daemon's FUSE export and
# the plain raw file, with fio and real clients. See docs/performance.md.
#
#   benches/run.sh [--quick] [--out DIR] [--only WORKLOAD[/IMAGE]] [options]
#
# Needs root (drop_caches, FUSE mounts), qemu-img, qemu-io,
# qemu-storage-daemon, fio, python3, cargo.
set -uo pipefail

usage() {
	cat <<'EOF'
usage: benches/run.sh [OPTIONS]

  --quick              small images (512 MiB), 1 round, short fio runs (a few minutes)
  --out DIR            results directory (default: bench-results/)
  --only PATTERN       run only WORKLOAD/IMAGE pairs matching the shell glob PATTERN
                       (a pattern without '/' means PATTERN/*), e.g. 'randread-*/qcow2';
                       may be given more than once
  --rounds N           rounds (default: quick 1, full 4; even numbers balance the order)
  --size MIB           image size in MiB (default: quick 512, full 4096)
  --runtime S          seconds per time-based fio run (default: quick 3, full 15)
  --cache-size SIZE    vdiskfs --cache-size (default 256M)
  --threads N          vdiskfs --threads (default: vdiskfs's own default)
  --images DIR         where images are built and kept between runs
                       (default: OUT/images-SIZE; rebuilt when missing)
  --no-build           do not run cargo build --release
  --transport LIST     vdiskfs transports to measure, comma-separated: classic (target
                       "vdiskfs"), uring (target "vdiskfs-uring", FUSE over io_uring);
                       default classic. Both: every row gets both, in the same round
  -h, --help           this text

workloads: seqread-psync seqread-aio16 randread-qd1 randread-qd32 sha256sum
           qemu-img-convert seqwrite-1m randwrite-4k seqwrite-1m-buf randwrite-4k-buf
images:    raw qcow2 vmdk-sparse vmdk-stream qcow2-comp chain vhd-dynamic vhdx (reads)
           raw-cached (reads, "transport only": the raw file in the host page cache,
           vdiskfs with --no-passthrough, against the raw file also in the page cache)
           qcow2-rw qcow2-overlay (writes)

environment: VDISKFS=PATH measures that vdiskfs binary instead of
             target/release/vdiskfs (for A/B runs of two builds; implies --no-build)
EOF
}

die() {
	echo "run.sh: $*" >&2
	exit 1
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HELPER="$HERE/helper.py"

MODE=full
OUT="$REPO/bench-results"
ONLY=()
ROUNDS=""
SIZE_MIB=""
RUNTIME=""
CACHE_SIZE=256M
THREADS=""
IMAGES=""
BUILD=1
TRANSPORTS=classic
while [ $# -gt 0 ]; do
	case "$1" in
	--quick) MODE=quick ;;
	--out) OUT=${2:?--out needs a directory}; shift ;;
	--only) ONLY+=("${2:?--only needs a pattern}"); shift ;;
	--rounds) ROUNDS=${2:?}; shift ;;
	--size) SIZE_MIB=${2:?}; shift ;;
	--runtime) RUNTIME=${2:?}; shift ;;
	--cache-size) CACHE_SIZE=${2:?}; shift ;;
	--threads) THREADS=${2:?}; shift ;;
	--images) IMAGES=${2:?}; shift ;;
	--no-build) BUILD=0 ;;
	--transport) TRANSPORTS=${2:?--transport needs classic, uring or classic,uring}; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done
if [ "$MODE" = quick ]; then
	: "${ROUNDS:=1}" "${SIZE_MIB:=512}" "${RUNTIME:=3}"
else
	: "${ROUNDS:=4}" "${SIZE_MIB:=4096}" "${RUNTIME:=15}"
fi
VDK_TARGETS=()
for t in ${TRANSPORTS//,/ }; do
	case "$t" in
	classic) VDK_TARGETS+=(vdiskfs) ;;
	uring) VDK_TARGETS+=(vdiskfs-uring) ;;
	*) die "--transport: classic or uring, not $t" ;;
	esac
done
[ ${#VDK_TARGETS[@]} -gt 0 ] || die "--transport: nothing to measure"
if [[ " ${VDK_TARGETS[*]} " == *" vdiskfs-uring "* ]]; then
	p=/sys/module/fuse/parameters/enable_uring
	[ -e $p ] || die "--transport uring: $p is missing (Linux 6.14+ with CONFIG_FUSE_IO_URING)"
	echo Y >$p || die "cannot turn on $p"
fi
# The daemons take turns going first; only an even number of rounds gives
# each the first place equally often for every workload and image.
if [ "$ROUNDS" -gt 1 ] && [ $((ROUNDS % 2)) = 1 ]; then
	echo "run.sh: warning: $ROUNDS rounds (odd): one daemon goes first more often in every row" >&2
fi
# Sequential runs read the whole image once, capped at this many seconds.
SEQ_CAP=$((RUNTIME * 10 + 20))
CACHE_MIB=$(python3 -c 'import sys
s=sys.argv[1].strip().upper().rstrip("B").rstrip("I")
m={"K":1/1024,"M":1,"G":1024,"T":1<<20}
print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s)>>20)' "$CACHE_SIZE") ||
	die "bad --cache-size $CACHE_SIZE"

[ "$(id -u)" = 0 ] || die "needs root (drop_caches and FUSE mounts)"
for t in qemu-img qemu-io qemu-storage-daemon fio python3 sha256sum; do
	command -v "$t" >/dev/null || die "$t is missing (scripts/setup.sh installs it)"
done
[ -c /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"

mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
: "${IMAGES:=$OUT/images-$SIZE_MIB}"
mkdir -p "$IMAGES" || die "cannot create $IMAGES"
IMAGES=$(cd "$IMAGES" && pwd)
WORK=$(mktemp -d "$OUT/work.XXXXXX") || die "cannot create a work dir in $OUT"
RUNS="$OUT/runs.jsonl"
LOG="$OUT/run.log"
: >"$RUNS"
: >"$LOG"
[ -n "${VDISKFS:-}" ] && BUILD=0
VDISKFS="${VDISKFS:-$REPO/target/release/vdiskfs}"

log() { echo "[$(date +%T)] $*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- cleanup
VDK_MOUNTS=()
QSD_PIDS=()
QSD_MOUNTS=()
cleanup() {
	local mp pid
	trap - EXIT INT TERM
	for mp in "${VDK_MOUNTS[@]}"; do
		[ -n "$mp" ] || continue
		"$VDISKFS" unmount "$mp" >/dev/null 2>&1 || umount -l "$mp" >/dev/null 2>&1
	done
	for pid in "${QSD_PIDS[@]}"; do
		[ -n "$pid" ] && kill "$pid" 2>/dev/null
	done
	for mp in "${QSD_MOUNTS[@]}"; do
		[ -n "$mp" ] || continue
		mountpoint -q "$mp" 2>/dev/null && umount -l "$mp" 2>/dev/null
	done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted" >&2; exit 130' INT TERM

# ---------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
	log "cargo build --release"
	(cd "$REPO" && cargo build --release --bin vdiskfs) >>"$LOG" 2>&1 ||
		die "cargo build --release failed (see $LOG)"
fi
[ -x "$VDISKFS" ] || die "$VDISKFS is missing (drop --no-build)"

# ---------------------------------------------------------------- selection
READ_WORKLOADS=(seqread-psync seqread-aio16 randread-qd1 randread-qd32 sha256sum qemu-img-convert)
WRITE_WORKLOADS=(seqwrite-1m randwrite-4k seqwrite-1m-buf randwrite-4k-buf)
READ_IMAGES=(raw qcow2 vmdk-sparse vmdk-stream qcow2-comp chain vhd-dynamic vhdx raw-cached)
WRITE_IMAGES=(qcow2-rw qcow2-overlay)

selected() { # WORKLOAD IMAGE
	[ ${#ONLY[@]} -eq 0 ] && return 0
	local p
	for p in "${ONLY[@]}"; do
		[[ "$p" == */* ]] || p="$p/*"
		# shellcheck disable=SC2053
		[[ "$1/$2" == $p ]] && return 0
	done
	return 1
}

image_needed() { # IMAGE
	local w
	for w in "${READ_WORKLOADS[@]}" "${WRITE_WORKLOADS[@]}"; do
		selected "$w" "$1" && return 0
	done
	return 1
}

# ---------------------------------------------------------------- images
# The file behind each image name, and its format for qemu-storage-daemon.
declare -A IMG_FILE=(
	[raw]=data.raw [raw-cached]=data.raw [qcow2]=disk.qcow2 [vmdk-sparse]=sparse.vmdk [vmdk-stream]=stream.vmdk
	[qcow2-comp]=comp.qcow2 [chain]=chain-top.qcow2 [qcow2-rw]=disk.qcow2 [qcow2-overlay]=disk.qcow2
	[vhd-dynamic]=dynamic.vhd
	[vhdx]=disk.vhdx
)
declare -A IMG_FMT=(
	[raw]=raw [raw-cached]=raw [qcow2]=qcow2 [vmdk-sparse]=vmdk [vmdk-stream]=vmdk
	[qcow2-comp]=qcow2 [chain]=qcow2 [qcow2-rw]=qcow2 [qcow2-overlay]=qcow2
	[vhd-dynamic]=vpc
	[vhdx]=vhdx
)

build_image() { # NAME
	local name=$1 f="$IMAGES/${IMG_FILE[$1]}" tmp
	[ -s "$f" ] && [ -e "$f.done" ] && return 0
	tmp="$f.tmp"
	rm -f "$f" "$f.done" "$tmp"
	log "building image $name ($SIZE_MIB MiB)"
	case "$name" in
	raw)
		python3 "$HELPER" gen "$tmp" "$SIZE_MIB" || return 1
		;;
	raw-cached)
		build_image raw
		return
		;;
	qcow2 | qcow2-rw | qcow2-overlay)
		build_image raw || return 1
		qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$IMAGES/data.raw" "$tmp" || return 1
		;;
	vmdk-sparse)
		build_image raw || return 1
		qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$IMAGES/data.raw" "$tmp" || return 1
		;;
	vmdk-stream)
		build_image raw || return 1
		qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$IMAGES/data.raw" "$tmp" || return 1
		;;
	vhd-dynamic)
		build_image raw || return 1
		qemu-img convert -f raw -O vpc -o subformat=dynamic "$IMAGES/data.raw" "$tmp" || return 1
		;;
	vhdx)
		build_image raw || return 1
		qemu-img convert -f raw -O vhdx -o subformat=dynamic "$IMAGES/data.raw" "$tmp" || return 1
		;;
	qcow2-comp)
		build_image raw || return 1
		qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536 "$IMAGES/data.raw" "$tmp" || return 1
		;;
	chain)
		# base: the whole disk; mid: every 4th 2 MiB stripe (offset 2 MiB);
		# top: every 4th 2 MiB stripe (offset 4 MiB) plus 1 MiB of every
		# mid stripe. Reads alternate between the three layers.
		build_image qcow2 || return 1
		local base="$IMAGES/chain-base.qcow2" mid="$IMAGES/chain-mid.qcow2" top="$IMAGES/chain-top.qcow2"
		rm -f "$base" "$mid"
		cp --reflink=auto "$IMAGES/disk.qcow2" "$base" || return 1
		qemu-img create -q -f qcow2 -o cluster_size=65536 -b chain-base.qcow2 -F qcow2 "$mid" || return 1
		qemu-img create -q -f qcow2 -o cluster_size=65536 -b chain-mid.qcow2 -F qcow2 "$tmp" || return 1
		local stripes=$((SIZE_MIB / 8)) i
		for ((i = 0; i < stripes; i++)); do
			echo "write -P $((i % 200 + 1)) $((i * 8 + 2))M 2M"
		done | qemu-io -f qcow2 "$mid" >/dev/null || return 1
		for ((i = 0; i < stripes; i++)); do
			echo "write -P $((i % 200 + 31)) $((i * 8 + 4))M 2M"
			echo "write -P $((i % 190 + 61)) $((i * 8 + 3))M 1M"
		done | qemu-io -f qcow2 "$tmp" >/dev/null || return 1
		# qemu-io wrote through the final name's backing path; rename last.
		;;
	esac
	mv "$tmp" "$f" && touch "$f.done"
}

# ---------------------------------------------------------------- helpers
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

now() { date +%s.%N; }

record() { python3 "$HELPER" record "$RUNS" "$@"; }

VDK_ARGS=(--cache-size "$CACHE_SIZE")
[ -n "$THREADS" ] && VDK_ARGS+=(--threads "$THREADS")

# Starts the exposure of IMAGE through TARGET; sets EXPOSED (the file to
# read), EXP_PID, EXP_MP. Returns 3 when vdiskfs refuses because a feature
# is not implemented (message in $WORK/mount.err).
expose() { # TARGET IMAGE
	local target=$1 image=$2 file="$IMAGES/${IMG_FILE[$2]}" fmt=${IMG_FMT[$2]}
	local writable=off src="$file"
	EXPOSED="" EXP_PID="" EXP_MP=""
	case "$image" in
	qcow2-rw)
		src="$WORK/rw.qcow2"
		cp --reflink=auto "$file" "$src" || return 1
		writable=on
		;;
	qcow2-overlay)
		# The same fresh overlay for both daemons, made by qemu-img.
		src="$WORK/overlay.qcow2"
		rm -f "$src"
		if [ "$target" != rawfile ]; then
			qemu-img create -q -f qcow2 -b "$file" -F qcow2 "$src" >/dev/null 2>"$WORK/mount.err" || return 1
		fi
		writable=on
		;;
	esac
	case "$target" in
	vdiskfs | vdiskfs-uring)
		EXP_MP="$WORK/mnt-vdiskfs"
		mkdir -p "$EXP_MP"
		local extra=(--transport classic)
		[ "$target" = vdiskfs-uring ] && extra=(--transport uring)
		case "$image" in
		qcow2-rw) extra+=(--rw) ;;
		qcow2-overlay) extra+=(--overlay "$src"); src="$file" ;;
		raw-cached) extra+=(--no-passthrough) ;;
		esac
		if ! "$VDISKFS" mount "${VDK_ARGS[@]}" "${extra[@]}" "$src" "$EXP_MP" 2>"$WORK/mount.err"; then
			grep -Eqi "not implemented|cannot be written|not supported" "$WORK/mount.err" && return 3
			return 1
		fi
		VDK_MOUNTS+=("$EXP_MP")
		local name
		name=$(basename "${src%.*}").raw
		EXPOSED="$EXP_MP/$name"
		EXP_PID=$("$VDISKFS" list --json | python3 "$HELPER" pid "$EXP_MP") || EXP_PID=""
		if [ "$target" = vdiskfs-uring ] &&
			! "$VDISKFS" list --json | python3 "$HELPER" transport "$EXP_MP" | grep -qx io_uring; then
			echo "vdiskfs fell back to the classic transport (see its log)" >"$WORK/mount.err"
			return 1
		fi
		;;
	qsd)
		EXP_MP="$WORK/qsd.raw"
		: >"$EXP_MP"
		rm -f "$WORK/qsd.pid"
		if ! qemu-storage-daemon \
			--blockdev "driver=file,node-name=file,filename=$src" \
			--blockdev "driver=$fmt,node-name=fmt,file=file" \
			--export "type=fuse,id=exp,node-name=fmt,mountpoint=$EXP_MP,writable=$writable,allow-other=off" \
			--pidfile "$WORK/qsd.pid" --daemonize 2>"$WORK/mount.err"; then
			return 1
		fi
		EXP_PID=$(cat "$WORK/qsd.pid")
		QSD_PIDS+=("$EXP_PID")
		QSD_MOUNTS+=("$EXP_MP")
		EXPOSED="$EXP_MP"
		;;
	rawfile)
		EXPOSED="$file"
		if [ "$writable" = on ]; then
			# Writes go to a copy of the raw data.
			EXPOSED="$WORK/rawcopy.raw"
			cp --reflink=auto "$IMAGES/data.raw" "$EXPOSED" || return 1
		else
			EXPOSED="$IMAGES/data.raw"
		fi
		;;
	esac
	return 0
}

unexpose() { # TARGET
	case "$1" in
	vdiskfs | vdiskfs-uring)
		"$VDISKFS" unmount "$EXP_MP" >>"$LOG" 2>&1 || umount -l "$EXP_MP" 2>/dev/null
		VDK_MOUNTS=("${VDK_MOUNTS[@]/$EXP_MP/}")
		;;
	qsd)
		kill "$EXP_PID" 2>/dev/null
		local i
		for ((i = 0; i < 100; i++)); do
			kill -0 "$EXP_PID" 2>/dev/null || break
			sleep 0.05
		done
		mountpoint -q "$EXP_MP" 2>/dev/null && umount -l "$EXP_MP" 2>/dev/null
		QSD_PIDS=("${QSD_PIDS[@]/$EXP_PID/}")
		QSD_MOUNTS=("${QSD_MOUNTS[@]/$EXP_MP/}")
		;;
	esac
	rm -f "$WORK/rw.qcow2" "$WORK/overlay.qcow2" "$WORK/rawcopy.raw"
}

vmhwm_kib() { # PID
	[ -n "$1" ] && awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null
}

# Runs WORKLOAD on $EXPOSED; prints "VALUE UNIT" or fails.
run_workload() { # WORKLOAD
	local w=$1 size=$((SIZE_MIB << 20)) json="$WORK/fio.json" t0 t1
	local fio=(fio --name=bench --filename="$EXPOSED" --output-format=json --output="$json"
		--size="$size" --group_reporting)
	case "$w" in
	seqread-psync)
		timeout $((SEQ_CAP + 60)) "${fio[@]}" --readonly --rw=read --bs=1M --ioengine=psync \
			--direct=0 --runtime="$SEQ_CAP" >"$WORK/wl.err" 2>&1 || return 1
		echo "$(python3 "$HELPER" fio "$json" read bw) MiB/s"
		;;
	seqread-aio16)
		timeout $((SEQ_CAP + 60)) "${fio[@]}" --readonly --rw=read --bs=1M --ioengine=libaio \
			--iodepth=16 --direct=1 --runtime="$SEQ_CAP" >"$WORK/wl.err" 2>&1 || return 1
		echo "$(python3 "$HELPER" fio "$json" read bw) MiB/s"
		;;
	randread-qd1)
		timeout $((RUNTIME + 60)) "${fio[@]}" --readonly --rw=randread --bs=4k --ioengine=psync \
			--direct=1 --time_based --runtime="$RUNTIME" >"$WORK/wl.err" 2>&1 || return 1
		echo "$(python3 "$HELPER" fio "$json" read iops) IOPS"
		;;
	randread-qd32)
		timeout $((RUNTIME + 60)) "${fio[@]}" --readonly --rw=randread --bs=4k --ioengine=libaio \
			--iodepth=32 --direct=1 --time_based --runtime="$RUNTIME" >"$WORK/wl.err" 2>&1 || return 1
		echo "$(python3 "$HELPER" fio "$json" read iops) IOPS"
		;;
	seqwrite-1m)
		timeout $((SEQ_CAP + 60)) "${fio[@]}" --rw=write --bs=1M --ioengine=libaio --iodepth=16 \
			--direct=1 --runtime="$SEQ_CAP" --end_fsync=1 >"$WORK/wl.err" 2>&1 || return 1
		echo "$(python3 "$HELPER" fio "$json" write bw) MiB/s"
		;;
	randwrite-4k)
		timeout $((RUNTIME + 60)) "${fio[@]}" --rw=randwrite --bs=4k --ioengine=libaio --iodepth=32 \
			--direct=1 --time_based --runtime="$RUNTIME" --end_fsync=1 >"$WORK/wl.err" 2>&1 || return 1
		echo "$(python3 "$HELPER" fio "$json" write iops) IOPS"
		;;
	seqwrite-1m-buf | randwrite-4k-buf)
		# Buffered writes (the page cache between the writer and the
		# daemon), timed from start to the end of the closing fsync.
		local rw=write bs=1M bytes=$size
		if [ "$w" = randwrite-4k-buf ]; then
			rw=randwrite bs=4k bytes=$((size / 8))
		fi
		t0=$(now)
		timeout $((SEQ_CAP * 3 + 60)) "${fio[@]}" --rw=$rw --bs=$bs --ioengine=psync --direct=0 \
			--io_size=$bytes --end_fsync=1 >"$WORK/wl.err" 2>&1 || return 1
		t1=$(now)
		if [ "$w" = randwrite-4k-buf ]; then
			python3 -c "print(f'{$bytes / 4096 / ($t1 - $t0):.1f} IOPS')"
		else
			python3 -c "print(f'{$bytes / 1048576 / ($t1 - $t0):.3f} MiB/s')"
		fi
		;;
	sha256sum)
		t0=$(now)
		timeout $((SEQ_CAP * 3 + 60)) sha256sum "$EXPOSED" >"$WORK/wl.err" 2>&1 || return 1
		t1=$(now)
		python3 -c "import sys; print(f'{$SIZE_MIB / ($t1 - $t0):.3f} MiB/s')"
		;;
	qemu-img-convert)
		# Output: a file on the same disk, no flush (-t unsafe), deleted after.
		rm -f "$WORK/convert.out"
		t0=$(now)
		timeout $((SEQ_CAP * 3 + 60)) qemu-img convert -f raw -O raw -t unsafe "$EXPOSED" \
			"$WORK/convert.out" >"$WORK/wl.err" 2>&1 || return 1
		t1=$(now)
		rm -f "$WORK/convert.out"
		python3 -c "import sys; print(f'{$SIZE_MIB / ($t1 - $t0):.3f} MiB/s')"
		;;
	*) return 1 ;;
	esac
}

unit_of() {
	case "$1" in
	randread-* | randwrite-*) echo IOPS ;;
	*) echo MiB/s ;;
	esac
}

# One measurement: expose, drop caches, run, record, unexpose.
measure() { # ROUND WORKLOAD IMAGE TARGET
	local round=$1 w=$2 image=$3 target=$4 rc res hwm="" unit
	unit=$(unit_of "$w")
	local rec_image=$image
	[ "$target" = rawfile ] && [ "$image" != raw-cached ] && rec_image=-
	expose "$target" "$image"
	rc=$?
	if [ $rc = 3 ]; then
		log "  $w $image $target: n/a ($(head -c 200 "$WORK/mount.err"))"
		record round="$round" workload="$w" image="$rec_image" target="$target" unit="$unit" \
			status=n/a note="vdiskfs: not implemented"
		return 0
	elif [ $rc != 0 ]; then
		log "  $w $image $target: cannot expose: $(head -c 300 "$WORK/mount.err" 2>/dev/null)"
		record round="$round" workload="$w" image="$rec_image" target="$target" unit="$unit" \
			status=fail note="cannot expose"
		unexpose "$target"
		return 0
	fi
	drop_caches
	# Transport only: the host file stays in the page cache, so what is
	# measured is the way requests travel, not the disk.
	[ "$image" = raw-cached ] && cat "$IMAGES/data.raw" >/dev/null
	: >"$WORK/wl.err"
	if res=$(run_workload "$w"); then
		cat "$WORK/wl.err" >>"$LOG"
		[[ "$target" == vdiskfs* ]] && hwm=$(vmhwm_kib "$EXP_PID")
		log "  $w $image $target: $res${hwm:+ (VmHWM ${hwm} KiB)}"
		record round="$round" workload="$w" image="$rec_image" target="$target" unit="$unit" \
			status=ok value="${res% *}" ${hwm:+rss_hwm_kib=$hwm} pid="${EXP_PID:-0}"
	elif cat "$WORK/wl.err" >>"$LOG" && [[ "$target" == vdiskfs* ]] &&
		grep -Eqi "not implemented|not supported|read-only file system" "$WORK/wl.err"; then
		log "  $w $image $target: n/a ($(grep -Eim1 "not implemented|not supported|read-only" "$WORK/wl.err"))"
		record round="$round" workload="$w" image="$rec_image" target="$target" unit="$unit" \
			status=n/a note="vdiskfs: not implemented"
	else
		log "  $w $image $target: FAILED (see $LOG)"
		record round="$round" workload="$w" image="$rec_image" target="$target" unit="$unit" \
			status=fail note="workload failed"
	fi
	unexpose "$target"
}

# ---------------------------------------------------------------- main
cat >"$OUT/meta.json" <<EOF
{"mode": "$MODE", "rounds": $ROUNDS, "size_mib": $SIZE_MIB, "runtime_s": $RUNTIME,
 "cache_size": "$CACHE_SIZE", "cache_mib": $CACHE_MIB, "threads": "${THREADS:-default}",
 "transports": "$TRANSPORTS",
 "date": "$(date -u +%FT%TZ)", "host": "$(uname -r)", "cpus": $(nproc),
 "commit": "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)",
 "qemu": "$(qemu-img --version | head -1)", "fio": "$(fio --version)"}
EOF

for img in "${READ_IMAGES[@]}" "${WRITE_IMAGES[@]}"; do
	image_needed "$img" || continue
	build_image "$img" || die "building image $img failed (see $LOG)"
done
build_image raw || die "building the raw file failed"

log "mode $MODE: $ROUNDS round(s), images $SIZE_MIB MiB, runtime ${RUNTIME}s, cache $CACHE_SIZE"
for ((round = 1; round <= ROUNDS; round++)); do
	# Alternate which daemon goes first, round by round and image by image.
	flip=$((round % 2))
	for w in "${READ_WORKLOADS[@]}" "${WRITE_WORKLOADS[@]}"; do
		case " ${WRITE_WORKLOADS[*]} " in
		*" $w "*) images=("${WRITE_IMAGES[@]}") ;;
		*) images=("${READ_IMAGES[@]}") ;;
		esac
		any=0
		for img in "${images[@]}"; do
			selected "$w" "$img" || continue
			any=1
			if [ $flip = 1 ]; then order=("${VDK_TARGETS[@]}" qsd); else order=(qsd "${VDK_TARGETS[@]}"); fi
			# The transport-only row has its own raw file: in the page cache too.
			[ "$img" = raw-cached ] && order+=(rawfile)
			flip=$((1 - flip))
			log "round $round/$ROUNDS: $w on $img"
			for target in "${order[@]}"; do
				measure "$round" "$w" "$img" "$target"
			done
		done
		# The physical limit: the plain raw file, once per workload and round.
		if [ $any = 1 ]; then
			measure "$round" "$w" "${images[0]}" rawfile
		fi
	done
done

log "results in $OUT (runs.jsonl, summary.json, table.txt, table.md)"
python3 "$HELPER" report "$OUT"
