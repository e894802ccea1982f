#!/usr/bin/env bash
# Install everything the datastore and its tests need on a fresh Debian machine.
# Idempotent: quick when everything is already there.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v qemu-nbd    >/dev/null || need_apt+=(qemu-utils)
command -v nbdkit      >/dev/null || need_apt+=(nbdkit)
command -v pkg-config  >/dev/null || need_apt+=(pkg-config)
command -v tgtd        >/dev/null || need_apt+=(tgt)
command -v iscsi-perf  >/dev/null || need_apt+=(libiscsi-bin)
[ -e /usr/include/iscsi/iscsi.h ] || need_apt+=(libiscsi-dev)
[ -e /usr/include/blkid/blkid.h ] || need_apt+=(libblkid-dev)
# What the mkfs-refusal tests put on LUNs first.
command -v mkfs.ext4   >/dev/null || need_apt+=(e2fsprogs)
command -v mkfs.xfs    >/dev/null || need_apt+=(xfsprogs)
command -v sfdisk      >/dev/null || need_apt+=(fdisk)
# The backup tests loop-mount an image read-only; the backup bench's yardsticks.
command -v losetup     >/dev/null || need_apt+=(mount)
command -v restic      >/dev/null || need_apt+=(restic)
command -v borg        >/dev/null || need_apt+=(borgbackup)
# Third-party readers of `vmfs backup attach --nbd` (nbdcopy, nbdinfo).
command -v nbdcopy     >/dev/null || need_apt+=(libnbd-bin)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# POSIX test tools from crates.io, pinned.
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest --version 0.2.2
command -v fsx       >/dev/null || cargo install --locked fsx --version 0.3.2
# The parsers' fuzzers (scripts/fuzz.sh runs each briefly).
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz --version 0.13.2

# The S3 server the backup tests run against (PyPI), pinned.
python3 -c 'import moto.server, flask' 2>/dev/null || python3 -m pip install --quiet 'moto[server]==5.2.1'

# pjdfstest switches to these identities (tests/conf/pjdfstest.toml).
getent group tests  >/dev/null || $SUDO groupadd tests
getent passwd tests >/dev/null || $SUDO useradd -g tests -M -s /usr/sbin/nologin tests

[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2; exit 1; }

# QEMU for the guest tests, from bookworm-backports so that it matches the
# image's qemu-utils 10.x (plain bookworm's 7.2 would remove it), and the
# small test guest (a Debian kernel and an initramfs, cached under
# /var/tmp/vmfs-guest; tests find it through VMFS_GUEST_DIR or that path).
command -v qemu-system-x86_64 >/dev/null || $SUDO ./tests/guest/install-qemu.sh
GUEST_DIR=${VMFS_GUEST_DIR:-/var/tmp/vmfs-guest}
./tests/guest/build-guest.sh "$GUEST_DIR" >/dev/null
