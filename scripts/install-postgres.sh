#!/usr/bin/env bash
# PostgreSQL's server programs (initdb, pg_ctl) for the replica tests, from the distribution's `postgresql`
# package. The tests start their own throw-away cluster; no system-wide one is created or started here.
# Idempotent: exits at once when initdb is already installed. Exit status 1 (and a line saying why) where
# it cannot install: the tests then skip with that reason.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-postgres.sh: no apt-get here; install PostgreSQL's server package yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-postgres.sh: not root and no password-less sudo: cannot install postgresql" >&2
    exit 1
  fi
fi
# postgresql-common would create and start a "main" cluster on install; the tests need none, so say so
# first (the conffile is kept by --force-confold when the package installs its own).
$SUDO mkdir -p /etc/postgresql-common
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || {
  echo "install-postgres.sh: the postgresql package installed no initdb under /usr/lib/postgresql" >&2
  exit 1
}
