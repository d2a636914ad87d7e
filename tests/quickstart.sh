#!/usr/bin/env bash
# Runs the README's first command exactly as written and curls the quick start against it:
# if the README drifts from what works, this fails.
set -euo pipefail
cd "$(dirname "$0")/.."

run_cmd=$(awk '/^```sh$/{getline; print; exit}' README.md)
[ -n "$run_cmd" ] || { echo "README.md has no first command"; exit 1; }
log=$(mktemp)
echo "quickstart: $run_cmd"
env -u OPENROUTER_API_KEY bash -c "exec $run_cmd" 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT

# Readiness is the daemon's own "Ready." line, not a guess. The command may compile first:
# wait as long as it is alive (bounded at 30 minutes).
for _ in $(seq 1 18000); do
  grep -q 'Ready\.' "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "quickstart: daemon exited"; exit 1; }
  sleep 0.1
done
grep -q 'Ready\.' "$log" || { cat "$log"; echo "quickstart: daemon never became ready"; exit 1; }
grep -q 'serving the built-in mock backend' "$log" || { cat "$log"; echo "quickstart: no mock warning"; exit 1; }

# The curl commands of the README's quick start, extracted and run as written.
awk '/^```sh quickstart$/{on=1; next} /^```$/{on=0} on' README.md > "$log.cmds"
[ -s "$log.cmds" ] || { echo "README.md has no quickstart block"; exit 1; }
plain=$(bash -c "$(sed -n 1p "$log.cmds")")
echo "$plain" | grep -q '"content":"Hello, orproxy!"' || { echo "plain answer: $plain"; exit 1; }
streamed=$(bash -c "$(sed -n 2p "$log.cmds")")
echo "$streamed" | grep -q 'data: \[DONE\]' || { echo "streamed answer: $streamed"; exit 1; }
[ "$(echo "$streamed" | grep -c '^data: {')" -ge 3 ] || { echo "too few events: $streamed"; exit 1; }
rm -f "$log.cmds"
echo "quickstart: ok"
