"""vramchat.tui."""
