#!/usr/bin/env bash
# The main job on defaults: a datastore over two LUN files, mounted with FUSE.
# Usage: scripts/demo.sh [DIR]   (default /tmp/vmfs-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --locked -p vmfs-tools
VMFS=$PWD/target/release/vmfs
DIR=${1:-/tmp/vmfs-demo}
mkdir -p "$DIR/mnt"
if grep -qs " $(realpath "$DIR/mnt") " /proc/self/mountinfo; then fusermount3 -u "$DIR/mnt"; fi
rm -f "$DIR/lun0.img" "$DIR/lun1.img"   # the demo's own LUN files: start afresh
truncate -s 1G "$DIR/lun0.img" "$DIR/lun1.img"
"$VMFS" mkfs --label demo "$DIR/lun0.img" "$DIR/lun1.img"
"$VMFS" mount "$DIR/lun0.img" "$DIR/lun1.img" "$DIR/mnt"
df -h "$DIR/mnt"
echo
echo "Datastore mounted on $DIR/mnt."
echo "  inspect:  $VMFS info $DIR/lun0.img $DIR/lun1.img"
echo "  unmount:  fusermount3 -u $DIR/mnt"
echo "  check:    $VMFS fsck $DIR/lun0.img $DIR/lun1.img"
