#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite: formatting, lints, unit, property,
# integration, end-to-end and fault-injection tests. CI runs exactly this (.ci/run).
#
#   bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/lifeboat-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Debian packages the build, the suite and the benches use.
. tests/prereqs.sh
lifeboat_prereqs tests
for c in "cargo fmt" "cargo clippy"; do
  $c --version >/dev/null 2>&1 || { echo "error: '$c' is missing (rustup component add rustfmt clippy)" >&2; exit 1; }
done

# cargo-deb, for the package test (pinned: see packaging/deb/build.sh).
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb"
  cargo install --locked cargo-deb@3.8.0 >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build (the integration tests run the real binaries)"
cargo build --workspace --bins
echo "== tests"
cargo test --workspace

# A bounded fuzz run of each decoder and of a receiver session, from the committed regression
# corpus (new inputs go to a scratch corpus). cargo-fuzz runs on the stable toolchain without
# a sanitizer. Longer by hand: LIFEBOAT_FUZZ_SECS=600 bash tests/run.sh
fuzz_secs="${LIFEBOAT_FUZZ_SECS:-20}"
if [ "$fuzz_secs" -gt 0 ]; then
  echo "== fuzz (${fuzz_secs}s per target)"
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz >/dev/null
  scratch="$(mktemp -d)"
  # Each line: crate, target, seed corpus. The decoders, and a whole receiver session fed
  # arbitrary frames (the malloc limit makes any unbounded allocation a failure).
  repo="$PWD"
  for spec in "common decode_frame decode_frame" "common decode_manifest decode_manifest" \
      "receiver session decode_frame" "receiver decode_segment decode_segment"; do
    read -r crate t seeds <<<"$spec"
    mkdir -p "$scratch/$t"
    if ! (cd "$crate" && cargo fuzz run "$t" -s none --target-dir "$CARGO_TARGET_DIR/fuzz" \
        "$scratch/$t" "$repo/common/fuzz/regressions/$seeds" -- \
        -max_total_time="$fuzz_secs" -malloc_limit_mb=512) >"$scratch/$t.log" 2>&1; then
      tail -40 "$scratch/$t.log" >&2
      echo "fuzz: $crate/$t failed; the input is in $crate/fuzz/artifacts/$t/ (add it to common/fuzz/regressions/$seeds)" >&2
      exit 1
    fi
    echo "$crate/$t: $(grep -E '^Done' "$scratch/$t.log" | tail -1)"
  done
  rm -rf "$scratch"
fi
