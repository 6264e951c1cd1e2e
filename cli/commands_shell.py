"""``p2pinfer completion``: shell completion scripts (click's own)."""

from __future__ import annotations

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for bash, zsh or fish (commands, options,
    choices).

    \b
    Examples:
      eval "$(p2pinfer completion bash)"       # add to ~/.bashrc
      eval "$(p2pinfer completion zsh)"        # add to ~/.zshrc
      p2pinfer completion fish > ~/.config/fish/completions/p2pinfer.fish
    """
    from click.shell_completion import get_completion_class

    root = click.get_current_context().find_root()
    cls = get_completion_class(shell)
    assert cls is not None  # click ships all three
    script = cls(root.command, {}, "p2pinfer", "_P2PINFER_COMPLETE").source()
    click.echo(script)


COMMANDS = [completion]
