# Sourced by tests/run.sh and tests/demo.sh: installs, from Debian's packages, what building
# and testing Lifeboat needs and this machine lacks.
#   clang, libelf-dev, zlib1g-dev, pkg-config: build the agent's eBPF tracker (agent/build.rs)
#   e2fsprogs, mount (losetup), util-linux (blkdiscard), fdisk (sfdisk): disks for the tests
#   zstd, systemd (systemd-analyze), faketime, xfsprogs, btrfs-progs: the tests and the benches
lifeboat_prereqs() {
  local need=()
  command -v clang >/dev/null 2>&1 || need+=(clang)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
  [ -e /usr/include/libelf.h ] || need+=(libelf-dev)
  [ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
  command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
  command -v losetup >/dev/null 2>&1 || need+=(mount)
  command -v blkdiscard >/dev/null 2>&1 || need+=(util-linux)
  command -v sfdisk >/dev/null 2>&1 || need+=(fdisk)
  if [ "${1:-}" = tests ]; then
    command -v zstd >/dev/null 2>&1 || need+=(zstd)
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    command -v faketime >/dev/null 2>&1 || need+=(faketime)
    command -v mkfs.xfs >/dev/null 2>&1 || need+=(xfsprogs)
    command -v mkfs.btrfs >/dev/null 2>&1 || need+=(btrfs-progs)
  fi
  [ ${#need[@]} -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
  fi
}
