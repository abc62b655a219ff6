# Sourced by the remote benches (remote.sh, remote_chain.sh): their shared
# preamble. bench_init NAME PORT TOOL... sets DELAY (default 20 ms), PORT
# (default PORT), BIN (default target/release/vdiskfs) and W, a fresh work
# folder under /tmp that is removed on exit after unmounting any "$W"/mnt*
# and killing the server whose pid is in SRV; it fails naming a missing tool.

bench_cleanup() {
  for m in "$W"/mnt*; do mountpoint -q "$m" 2>/dev/null && "$BIN" unmount "$m" || true; done
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null || true
  rm -rf "$W"
}

bench_init() {
  local name=$1 port=$2 t
  shift 2
  DELAY=${DELAY:-20}
  PORT=${PORT:-$port}
  BIN=${BIN:-$PWD/target/release/vdiskfs}
  W=$(mktemp -d "/tmp/vdiskfs-$name-bench.XXXXXX")
  SRV=
  trap bench_cleanup EXIT
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "$name.sh: $t is missing" >&2; exit 1; }
  done
}
