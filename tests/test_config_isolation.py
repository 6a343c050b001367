"""A developer's own config cannot change a test's outcome.

A broken config is put where the code looks when nothing isolates it: $HOME/.config/vramchat/
config.toml, with HOME pointing at a temporary home and no XDG or VRAMCHAT variables set, as on
a developer's machine. A pytest of its own then runs one real daemon test in that environment:
it passes through conftest's per-test home, and fails with --use-my-config, which turns that
home off. The second run shows the broken config is really read, so the first one proves something.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramchat.shared import paths

from helpers import USER_VARIABLES, IsolatedHome

ROOT = Path(__file__).parent.parent
# A chat against the tiny model from two clients: a daemon, its engine and a reply.
DAEMON_TEST = "tests/test_daemon.py::test_two_clients_receive_the_same_tokens_as_stored"

# Each broken config, and what the daemon test's failure shows when nothing isolates it.
BROKEN_CONFIGS = {
    "invalid-toml": ('model_dirs = ["~/models"\nn_ctx = \n', "cannot read config file"),
    # Valid TOML with well-formed keys, none of which suits the tests' daemons and clients.
    "hostile": (
        'default_model = "/nonexistent/missing.gguf"\nn_ctx = 16\nn_threads = 999\nstate_cache_mib = 0\n[keys]\nquit = "enter"\n',
        "not 999",
    ),
}


def run_daemon_test(home: Path, basetemp: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """DAEMON_TEST in a pytest of its own, with HOME=`home` and none of the variables that the
    per-test home sets: the config the code finds on its own is $HOME/.config/vramchat/config.toml."""
    env = {name: value for name, value in os.environ.items() if name not in USER_VARIABLES}
    env["HOME"] = str(home)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", DAEMON_TEST, "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}", *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("broken", sorted(BROKEN_CONFIGS))
def test_a_broken_config_in_the_home_changes_no_test_outcome(broken: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = home / ".config" / "vramchat" / "config.toml"
    config.parent.mkdir(parents=True)
    text, evidence = BROKEN_CONFIGS[broken]
    config.write_text(text)

    isolated = run_daemon_test(home, tmp_path / "isolated")
    assert isolated.returncode == 0, f"the daemon test failed with a broken config in HOME:\n{isolated.stdout}{isolated.stderr}"
    assert "1 passed" in isolated.stdout, isolated.stdout

    exposed = run_daemon_test(home, tmp_path / "exposed", "--use-my-config")
    assert exposed.returncode == 1, (
        f"the broken config should break the test without the per-test home:\n{exposed.stdout}{exposed.stderr}"
    )
    assert "1 failed" in exposed.stdout or "1 error" in exposed.stdout, exposed.stdout
    assert evidence in exposed.stdout, exposed.stdout


def test_every_test_sees_its_own_empty_config(isolated_home: IsolatedHome | None) -> None:
    if isolated_home is None:  # --use-my-config: no per-test home; the config is the developer's own
        assert "vc-home-" not in str(Path.home()) and "vc-home-" not in str(paths.config_path())
        return
    assert paths.config_path() == isolated_home.config_file and isolated_home.config_file.read_text() == ""
    assert Path.home() == isolated_home.home and paths.runtime_dir() == isolated_home.runtime_dir
    assert paths.data_dir() == isolated_home.data_dir and paths.cache_dir() == isolated_home.cache_dir
    assert str(paths.state_dir()).startswith(str(isolated_home.home))
