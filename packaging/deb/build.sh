#!/usr/bin/env bash
# Builds lifeboat-agent and lifeboat-receiver .deb packages (binaries, systemd units, example
# configs, docs, man pages and shell completions generated from the binaries) into
# $CARGO_TARGET_DIR/debian/. cargo-deb is installed from crates.io when missing.
#
#   bash packaging/deb/build.sh              # from a release build
#   PROFILE=dev bash packaging/deb/build.sh  # from the dev build (what the tests install)
#   NO_BUILD=1 ...                           # package the binaries already built
#   OUT=DIR ...                              # where the packages go
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lifeboat-target}"
profile="${PROFILE:-release}"
case "$profile" in dev) out_dir=debug ;; *) out_dir="$profile" ;; esac
# Pinned: the dev profile (the tests) is deprecated in cargo-deb and may go in a later major.
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb@3.8.0 >/dev/null
[ -n "${NO_BUILD:-}" ] || cargo build --profile "$profile" --bins -p lifeboat-agent -p lifeboat-receiver
docs="$CARGO_TARGET_DIR/$out_dir/lifeboat-docs"
rm -rf "$docs"
"$CARGO_TARGET_DIR/$out_dir/lifeboat-agent" generate-docs "$docs/agent"
"$CARGO_TARGET_DIR/$out_dir/lifeboat-receiver" generate-docs "$docs/receiver"
out="${OUT:-$CARGO_TARGET_DIR/debian}"
mkdir -p "$out"
log="$(mktemp)"
for p in lifeboat-agent lifeboat-receiver; do
  if ! cargo deb --no-build --profile "$profile" -p "$p" -o "$out/" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
done
rm -f "$log"
ls "$out"/*.deb
