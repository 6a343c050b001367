"""vramchat.daemon."""
