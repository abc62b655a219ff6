#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then
# runs the format and lint gates and every test (unit, library against
# qemu-img, real FUSE mounts, the shared testdata manifest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f ../shared/testdata/MANIFEST.tsv ] || {
  echo "test: ../shared/testdata/MANIFEST.tsv is missing (the shared test images must sit beside the repository)" >&2
  exit 1
}
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --release --no-fail-fast
