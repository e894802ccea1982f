#!/usr/bin/env bash
# Install what the tests need, then run every test of the workspace:
# unit and property tests, NBD against qemu-nbd and nbdkit, FUSE mounts,
# pjdfstest, fsx, corruption and CLI tests; then a short run of every
# fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --release --workspace --locked
./scripts/fuzz.sh 8
