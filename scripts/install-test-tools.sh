#!/usr/bin/env bash
# System tools some tests drive: systemd-analyze (unit files) and tmux (the TUI as a person
# uses it). Installed with apt when missing and we are root; otherwise says what to install.
set -euo pipefail
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing test tools: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "==> the tests need: ${missing[*]} (install them with your package manager)" >&2
fi
