# Two commands do all of the setup: `make run` and `make test`. Both are safe to repeat.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench daemon

install:
	@scripts/install.sh

# Starts vramchatd in the background unless one already answers, then opens the TUI.
run: install
	@scripts/ensure-daemon.sh
	@$(BIN)/vramchat

daemon: install
	@scripts/ensure-daemon.sh

# ruff (lint and format) and mypy over the whole tree; `make test` fails when either does.
lint: install
	@echo "==> ruff check, ruff format --check, mypy"
	@$(BIN)/ruff check --quiet .
	@$(BIN)/ruff format --check --quiet .
	@scripts/typecheck.sh

test: lint
	@scripts/install-test-tools.sh
	@$(BIN)/python -m pytest -q -ra --durations=20

bench: install
	@$(BIN)/python -m benchmarks
