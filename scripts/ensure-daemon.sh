#!/usr/bin/env bash
# Starts vramchatd in the background unless one already answers, and waits until it listens.
# Its log goes to the XDG state dir; `make run` then opens the TUI on it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

if "$BIN/vramchat" status >/dev/null 2>&1; then
    echo "==> vramchatd is already running"
    exit 0
fi
log_dir=$("$BIN/python" -c 'from vramchat.shared.paths import state_dir; print(state_dir())')
mkdir -p "$log_dir"
log="$log_dir/vramchatd.log"
echo "==> starting vramchatd in the background (log: $log)"
nohup "$BIN/vramchatd" >>"$log" 2>&1 </dev/null &
for _ in $(seq 1 100); do
    if "$BIN/vramchat" status >/dev/null 2>&1; then
        exit 0
    fi
    if ! kill -0 $! 2>/dev/null; then
        echo "vramchatd exited; the end of its log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "vramchatd did not answer within 20 s; see $log" >&2
exit 1
