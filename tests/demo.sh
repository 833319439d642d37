#!/usr/bin/env bash
# The main job on the embedded default (local target, no AWS account):
# build, start a receiver with a local state dir, replicate a sample disk image with an agent,
# cut a point, change the image, cut another, restore both points, and show that the restored
# bytes equal the source at each point.
#
#   bash tests/demo.sh            # work dir: /var/tmp/lifeboat-demo (LIFEBOAT_DEMO_DIR to change)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lifeboat-target}"
demo="${LIFEBOAT_DEMO_DIR:-/var/tmp/lifeboat-demo}"
if [ -t 1 ]; then say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }; else say() { printf '\n== %s\n' "$*"; }; fi

say "build prerequisites (clang and libelf for the eBPF tracker, e2fsprogs for the sample image)"
. tests/prereqs.sh
lifeboat_prereqs

say "building (release)"
cargo build --release --bins -p lifeboat-agent -p lifeboat-receiver
bin="$CARGO_TARGET_DIR/release"
rx="$bin/lifeboat-receiver"
agent="$bin/lifeboat-agent"

rm -rf "$demo" && mkdir -p "$demo"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 17443)

say "receiver: init and serve on 127.0.0.1:$port (state in $demo/receiver)"
"$rx" --state-dir "$demo/receiver" init --listen "127.0.0.1:$port" --json > "$demo/init.json"
fp=$(sed -E 's/.*"ca_fingerprint":"([^"]+)".*/\1/' "$demo/init.json")
token=$(sed -E 's/.*"token":"([^"]+)".*/\1/' "$demo/init.json")
"$rx" --state-dir "$demo/receiver" serve > "$demo/receiver.log" 2>&1 &
rx_pid=$!
trap 'kill $rx_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

say "sample disk: a 256 MiB ext4 image holding /usr/share/doc and the Lifeboat sources"
img="$demo/disk.img"
if command -v mkfs.ext4 >/dev/null 2>&1; then
  content="$demo/content"; mkdir -p "$content"
  cp -r /usr/share/doc "$content/doc" 2>/dev/null || true
  # The tracked sources only: build and fuzzing output (fuzz/target, corpora) can be large.
  if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z common agent receiver | tar --null -T - -cf - | tar -C "$content" -xf -
  else
    cp -r common agent receiver "$content/"
  fi
  truncate -s 256M "$img"
  mkfs.ext4 -q -F -d "$content" "$img"
else
  echo "(mkfs.ext4 not found: using a generated image instead)"
  truncate -s 256M "$img"
  head -c 64M /dev/urandom | dd of="$img" bs=1M seek=32 conv=notrunc status=none
fi

cat > "$demo/agent.toml" <<TOML
server_id = "demo-server"
state_dir = "$demo/agent-state"
point_interval_secs = 5

[receiver]
address = "127.0.0.1:$port"
ca_fingerprint = "$fp"
token = "$token"

[[disks]]
id = "root"
path = "$img"
TOML
"$agent" validate --config "$demo/agent.toml"

say "agent: initial sync and point 1"
"$agent" run --once --config "$demo/agent.toml"
cp --sparse=always "$img" "$demo/source-at-point-1.img"

say "changing the disk: 6 MiB of new data, 1 MiB zeroed"
head -c 6M /dev/urandom | dd of="$img" bs=1M seek=100 conv=notrunc status=none
dd if=/dev/zero of="$img" bs=1M seek=2 count=1 conv=notrunc status=none

say "agent: point 2 (only the changed blocks travel)"
"$agent" run --once --config "$demo/agent.toml"
cp --sparse=always "$img" "$demo/source-at-point-2.img"

say "receiver: servers and points"
"$rx" --state-dir "$demo/receiver" servers
echo
"$rx" --state-dir "$demo/receiver" points --server demo-server

for p in 1 2; do
  say "restore point $p"
  "$rx" --state-dir "$demo/receiver" restore --server demo-server --disk root --point "$p" --to "$demo/restored-$p.img"
  if cmp "$demo/restored-$p.img" "$demo/source-at-point-$p.img"; then
    echo "OK: point $p restored byte-identical to the source at point $p ($(sha256sum < "$demo/restored-$p.img" | cut -c1-16)…)"
  else
    echo "FAILED: point $p differs from the source" >&2
    exit 1
  fi
done
if cmp -s "$demo/restored-1.img" "$demo/restored-2.img"; then
  echo "FAILED: points 1 and 2 are identical; the change was not captured" >&2
  exit 1
fi
say "done: both points restored and proven; files in $demo"
