# Sourced by tests/run.sh and tests/demo.sh: installs, from Debian's packages, what building
# and testing Lifeboat needs and this machine lacks.
#   clang, libelf-dev, zlib1g-dev, pkg-config: build the agent's eBPF tracker (agent/build.rs)
#   e2fsprogs, mount (losetup), util-linux (blkdiscard), fdisk (sfdisk): disks for the tests
#   zstd, systemd (systemd-analyze), faketime, xfsprogs, btrfs-progs: the tests and the benches
#   prometheus (prometheus, promtool): the alert rules' unit tests and a real scrape
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
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  fi
  if [ "${1:-}" = tests ]; then
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    lifeboat_apt "${need[@]}"
  fi
  [ "${1:-}" = tests ] && lifeboat_moto
  return 0
}

# moto in server mode (EC2 images and instances for the recovery tests), from PyPI, in its
# own virtualenv outside the clone (reused by later runs); the tests find it through
# LIFEBOAT_MOTO_SERVER.
lifeboat_moto() {
  local venv="${LIFEBOAT_VENV:-/var/tmp/lifeboat-venv}"
  if [ ! -x "$venv/bin/moto_server" ]; then
    echo "installing moto[server] into $venv"
    python3 -m venv "$venv" && "$venv/bin/pip" install -q 'moto[server]>=5,<6' \
      || { echo "error: could not install moto into $venv" >&2; return 1; }
  fi
  export LIFEBOAT_MOTO_SERVER="$venv/bin/moto_server"
}

lifeboat_apt() {
  local need=("$@")
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
  fi
}
