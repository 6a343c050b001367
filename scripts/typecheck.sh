#!/usr/bin/env bash
# Type-checks the whole tree with mypy (settings in pyproject.toml).
#
# The folders shared/, daemon/ and tui/ are installed as vramchat.shared, vramchat.daemon and
# vramchat.tui (pyproject's package-dir), a mapping mypy cannot follow. It checks them through
# build/typecheck/vramchat/, a tree of links with the installed layout.
set -euo pipefail
cd "$(dirname "$0")/.."
links=build/typecheck/vramchat
mkdir -p "$links"
for part in shared daemon tui; do
    ln -sfn "../../../$part" "$links/$part"
done
.venv/bin/mypy -p vramchat.shared -p vramchat.daemon -p vramchat.tui
.venv/bin/mypy benchmarks tests
