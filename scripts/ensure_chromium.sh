#!/usr/bin/env bash
# The studio's browser test drives Debian's Chromium (the browser download of `playwright install` is not
# reachable from our machines). Install it when it is missing; needs root and apt (as on CI).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "the studio browser test needs Chromium at /usr/bin/chromium: install Debian's chromium package" >&2
  exit 1
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
command -v chromium
