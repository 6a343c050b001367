# Two commands do all of the setup: `make run` and `make test`. Both are safe to repeat.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test bench daemon

install:
	@scripts/install.sh

# Starts vramchatd in the background unless one already answers, then opens the TUI.
run: install
	@scripts/ensure-daemon.sh
	@$(BIN)/vramchat

daemon: install
	@scripts/ensure-daemon.sh

test: install
	@scripts/install-test-tools.sh
	@$(BIN)/python -m pytest -q -ra

bench: install
	@$(BIN)/python -m benchmarks
