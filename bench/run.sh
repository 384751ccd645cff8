#!/usr/bin/env bash
# The relay's benchmark, in one command (README: Performance):
#
#   bash bench/run.sh            # every scenario, ~6 minutes; the table goes to bench/results.md
#   bash bench/run.sh --quick    # smaller counts and windows: checks that it all works
#   bash bench/run.sh --only cpu # one scenario: cpu, latency, knee, producer, idle, batch (or parts: wrk,
#                                # relay-default, relay-high, naive, lat-default, lat-high, lat-naive)
#
# It installs wrk if missing (Debian's package), builds the release binaries (the relay and the
# workspace's benchmark driver, crates/bench), and runs `cfq-bench run` (crates/bench/src/
# scenarios.rs): the emulator, the webhook receiver and the relay each as a process of its own
# on 127.0.0.1, wrk against the same receiver for the machine's limit, a naive sequential
# consumer for the floor. Every loop is bounded in count and time.
#
# Profiling aids (see crates/bench/src/runs.rs and bed.rs):
#   CFQ_BENCH_PROFILE='perf record -g -p $PID -o /tmp/$NAME.perf' bash bench/run.sh --only relay-default
#   CFQ_BENCH_RELAY_WRAPPER='valgrind --tool=callgrind' bash bench/run.sh --only relay-default --messages 5000
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk (Debian's package)" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi

echo "bench: building the release binaries" >&2
cargo build --release --locked --quiet -p cfq-relay -p cfq-bench

# 1,000 deliveries in flight need as many sockets, and the receiver as many again.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

target="${CARGO_TARGET_DIR:-target}"
# A full run's table replaces bench/results.md; partial or quick runs go to the target dir.
out=bench/results.md
case " $* " in
  *" --out"*) exec "$target/release/cfq-bench" run "$@" ;;
  *" --quick "* | *" --only"* | *" --messages"* | *" --size"*) out="$target/bench-results.md" ;;
esac
exec "$target/release/cfq-bench" run --out "$out" "$@"
