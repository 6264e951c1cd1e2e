"""``python -m p2pinfer.daemon``: the same as ``p2pinfer daemon``."""

from p2pinfer.cli.main import main

main(["daemon", *__import__("sys").argv[1:]])
