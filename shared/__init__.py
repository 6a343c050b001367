"""vramchat.shared: what the daemon, the TUI and the CLI have in common (no Textual, no llama.cpp)."""

from importlib import metadata

try:
    __version__ = metadata.version("vramchat")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
