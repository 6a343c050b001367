"""vramchat.shared."""
