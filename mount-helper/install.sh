#!/bin/sh
# Installs vdiskfs and its mount(8) helper.
#
#   mount-helper/install.sh [--bin PATH] [--bindir DIR] [--sbindir DIR] [--uninstall]
#
#   --bin PATH     the vdiskfs binary to install (default: target/release/vdiskfs
#                  of this repository; build it with `cargo build --release`)
#   --bindir DIR   where vdiskfs goes (default /usr/local/bin)
#   --sbindir DIR  where mount.vdiskfs and mount.fuse.vdiskfs go (default /sbin:
#                  util-linux's mount(8) looks for helpers only in /sbin,
#                  /sbin/fs.d and /sbin/fs — a fixed list, not $PATH)
#   --uninstall    remove what an install with the same directories put there
#   DESTDIR        staging root for packaging (paths inside the helper stay
#                  without it)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/../target/release/vdiskfs
bindir=/usr/local/bin
sbindir=/sbin
uninstall=
DESTDIR=${DESTDIR:-}
while [ $# -gt 0 ]; do
    case $1 in
    --bin) bin=$2; shift 2 ;;
    --bindir) bindir=$2; shift 2 ;;
    --sbindir) sbindir=$2; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 1 ;;
    esac
done

if [ -n "$uninstall" ]; then
    rm -f "$DESTDIR$bindir/vdiskfs" "$DESTDIR$sbindir/mount.vdiskfs" "$DESTDIR$sbindir/mount.fuse.vdiskfs"
    echo "removed vdiskfs from $bindir and its mount helper from $sbindir"
    exit 0
fi

[ -x "$bin" ] || { echo "install.sh: $bin is missing: run cargo build --release, or pass --bin PATH" >&2; exit 1; }
install -d "$DESTDIR$bindir" "$DESTDIR$sbindir"
# Stripped: the release profile keeps debug info (for perf), which
# multiplies the binary's size and is of no use to an installed copy.
if command -v strip >/dev/null 2>&1; then
    install -s -m 0755 "$bin" "$DESTDIR$bindir/vdiskfs"
else
    echo "install.sh: strip is missing (apt-get install binutils): installing unstripped" >&2
    install -m 0755 "$bin" "$DESTDIR$bindir/vdiskfs"
fi
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed "s|@VDISKFS@|$bindir/vdiskfs|" "$here/mount.vdiskfs" > "$tmp"
install -m 0755 "$tmp" "$DESTDIR$sbindir/mount.vdiskfs"
ln -sf mount.vdiskfs "$DESTDIR$sbindir/mount.fuse.vdiskfs"
echo "installed $bindir/vdiskfs, $sbindir/mount.vdiskfs and $sbindir/mount.fuse.vdiskfs"
