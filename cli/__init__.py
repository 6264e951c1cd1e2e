"""The p2pinfer command-line interface."""
