"""vramchat.tui: the Textual app (app.py) and the `vramchat` command (cli.py, commands/)."""
