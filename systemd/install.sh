#!/usr/bin/env bash
# Installs orproxy as a systemd service.
#
#   systemd/install.sh                 build (release) and install under /usr, then set up the user
#   DESTDIR=/tmp/pkg systemd/install.sh   stage into a directory (packaging); nothing is started
#   PREFIX=/usr/local ...              another prefix (the unit's paths follow it)
#   ORPROXY_BIN=path ...               install this binary instead of building one
#   systemd/install.sh --uninstall [--purge]   remove it again (--purge also removes config and data)
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr}
DESTDIR=${DESTDIR:-}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
SYSUSERSDIR=${SYSUSERSDIR:-$PREFIX/lib/sysusers.d}
SHAREDIR=$PREFIX/share/orproxy
BIN=$PREFIX/bin/orproxy
live=$([ -z "$DESTDIR" ] && echo yes || echo no)

uninstall() {
  if [ "$live" = yes ] && command -v systemctl >/dev/null; then
    systemctl disable --now orproxy.service 2>/dev/null || true
  fi
  rm -f "$DESTDIR$BIN" "$DESTDIR$UNITDIR/orproxy.service" "$DESTDIR$SYSUSERSDIR/orproxy.conf"
  rm -rf "$DESTDIR$SHAREDIR"
  if [ "${1:-}" = --purge ]; then
    rm -rf "$DESTDIR$SYSCONFDIR/orproxy" "$DESTDIR/var/lib/orproxy"
  fi
  [ "$live" = yes ] && command -v systemctl >/dev/null && systemctl daemon-reload || true
  echo "orproxy uninstalled${1:+ ($1)}"
}

if [ "${1:-}" = --uninstall ]; then
  uninstall "${2:-}"
  exit 0
fi

if [ -z "${ORPROXY_BIN:-}" ]; then
  cargo build --release --locked -p orproxy
  ORPROXY_BIN=${CARGO_TARGET_DIR:-target}/release/orproxy
fi

install -Dm755 "$ORPROXY_BIN" "$DESTDIR$BIN"
install -d "$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$SHAREDIR/examples/rules"
sed -e "s|/usr/bin/orproxy|$BIN|g" -e "s|/etc/orproxy|$SYSCONFDIR/orproxy|g" systemd/orproxy.service >"$DESTDIR$UNITDIR/orproxy.service"
chmod 644 "$DESTDIR$UNITDIR/orproxy.service"
install -m644 systemd/orproxy.sysusers "$DESTDIR$SYSUSERSDIR/orproxy.conf"
install -m644 schemas/config.example.yaml schemas/config.schema.json "$DESTDIR$SHAREDIR/"
for f in rules/*; do install -m644 "$f" "$DESTDIR$SHAREDIR/examples/rules/"; done

# Configuration is the operator's: created once, never overwritten.
install -d -m750 "$DESTDIR$SYSCONFDIR/orproxy" "$DESTDIR$SYSCONFDIR/orproxy/rules"
[ -e "$DESTDIR$SYSCONFDIR/orproxy/config.yaml" ] || install -m640 systemd/config.yaml "$DESTDIR$SYSCONFDIR/orproxy/config.yaml"
if [ ! -e "$DESTDIR$SYSCONFDIR/orproxy/env" ]; then
  install -m600 /dev/null "$DESTDIR$SYSCONFDIR/orproxy/env"
  echo "# OPENROUTER_API_KEY=sk-or-v1-..." >"$DESTDIR$SYSCONFDIR/orproxy/env"
fi

if [ "$live" = yes ]; then
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$SYSUSERSDIR/orproxy.conf"
  elif ! id orproxy >/dev/null 2>&1; then
    # The same system user as sysusers.d/orproxy.conf, where systemd-sysusers is missing.
    useradd --system --user-group --home-dir /var/lib/orproxy --no-create-home \
      --shell /usr/sbin/nologin --comment "orproxy routing daemon" orproxy
  fi
  chgrp -R orproxy "$SYSCONFDIR/orproxy" 2>/dev/null || true
  command -v systemctl >/dev/null && systemctl daemon-reload
  echo "installed: put keys in $SYSCONFDIR/orproxy/env, then: systemctl enable --now orproxy"
else
  echo "staged into $DESTDIR"
fi
