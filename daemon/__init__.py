"""The p2pinfer daemon: runs a node from a TOML config and environment variables."""
