#!/usr/bin/env bash
# A short run of every cargo-fuzz target (the on-disk and wire parsers:
# volume header, descriptors, lock sectors, journal replay, directory
# buckets, RDM and VMDK descriptors, sparse extents, change tracking, the
# control protocol, heartbeat slots with their mailbox, SCSI data, the SCSI target, virtio-scsi descriptor
# chains, LUN URLs, the read-only NBD server, backup
# repository objects). SECONDS per target (default 10).
# cargo-fuzz needs nightly's -Z flags: the machine's one (stable) toolchain
# accepts them with RUSTC_BOOTSTRAP=1. Any crash fails the run; its input
# is left under fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-10}"
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in $(cargo fuzz list); do
  echo "fuzz: $t for ${secs}s"
  mkdir -p "corpus/$t"
  rm -rf "artifacts/$t"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=0 2>&1 \
    | grep -E '^Done|ERROR|panicked|SUMMARY' || true
  # cargo fuzz exits non-zero on a crash: pipefail is off for the grep
  # above, so check the artifact directory instead.
  if ls "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
    echo "fuzz: $t found a failing input: fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
