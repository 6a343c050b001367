"""The `vramchat` subcommands, one module per family; each has a `register(subparsers)`."""
