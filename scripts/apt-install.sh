#!/usr/bin/env bash
# apt-install.sh WHY PACKAGE...: installs Debian packages with apt-get, as root or through a
# password-less sudo, updating the package lists only if the first try fails. Without either
# it prints the one command to run and fails. Used by scripts/setup.sh and web/setup.sh.
set -euo pipefail
why=$1
shift
if ! command -v apt-get >/dev/null; then
  echo "$why: no apt-get here; install $* yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo"
  else
    echo "$why. Run as root: apt-get install -y --no-install-recommends $*" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends "$@" >/dev/null; then
  $SUDO apt-get update >/dev/null
  $SUDO apt-get install -y --no-install-recommends "$@" >/dev/null
fi
