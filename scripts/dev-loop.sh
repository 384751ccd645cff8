#!/usr/bin/env bash
# Develop without a Cloudflare account (README: "Develop without an account"): the emulator, a
# webhook receiver and the relay on this machine; publish one message and watch it be delivered
# and acked. Ends (stopping all three) once the message is acked, or fails within ~20 s.
#
#   scripts/dev-loop.sh                                   # cfq-relay from the PATH
#   CFQ_RELAY=target/release/cfq-relay scripts/dev-loop.sh
#
# Uses the ports of config/emulator.toml: 8787 (API), 8080 (webhook), 9464 (admin).
set -euo pipefail
cd "$(dirname "$0")/.."

relay=${CFQ_RELAY:-cfq-relay}
# The emulator's arguments, all in this one place.
emulate_args=(--token dev-token --queue dev-queue)
token=dev-token
api=http://127.0.0.1:8787/client/v4
account=0123456789abcdef0123456789abcdef
queue=dev-queue

if ! command -v "$relay" >/dev/null 2>&1; then
  echo "dev-loop: $relay is not on the PATH: run \`cargo install --path .\`, or set" \
    "CFQ_RELAY=target/release/cfq-relay after \`cargo build --release\`" >&2
  exit 1
fi

pids=()
stop() {
  # SIGTERM: the relay drains and exits 0; the emulator and the receiver just stop.
  if [ ${#pids[@]} -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
trap stop EXIT

# Poll until the command succeeds, at most ~10 s.
until_ok() {
  local what=$1
  shift
  for _ in $(seq 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "dev-loop: gave up waiting for $what" >&2
  exit 1
}

echo "== 1. the Cloudflare Queues emulator: $api"
"$relay" emulate "${emulate_args[@]}" &
pids+=($!)
until_ok "the emulator" curl -s -o /dev/null "$api/_emulator/queues/$queue/stats"

echo "== 2. publish a message to $queue"
curl -sf -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"body": {"hello": "world"}, "content_type": "json"}' \
  "$api/accounts/$account/queues/$queue/messages"
echo

echo "== 3. a webhook sink on http://127.0.0.1:8080"
"$relay" receive --print &
pids+=($!)
until_ok "the receiver" curl -sf -o /dev/null http://127.0.0.1:8080/_receiver/stats

echo "== 4. the relay: config/emulator.toml"
"$relay" run --config config/emulator.toml &
pids+=($!)

echo "== 5. the queue's stats (the emulator wants the token here too)"
acked() {
  curl -sf -H "Authorization: Bearer $token" "$api/_emulator/queues/$queue/stats" \
    | grep -q '"acked":1\b'
}
until_ok "the message to be acked" acked
curl -sf -H "Authorization: Bearer $token" "$api/_emulator/queues/$queue/stats"
echo
echo "dev-loop: the message was delivered to the webhook and acked"
