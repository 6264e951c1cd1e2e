"""Inference commands: ``prompt``, ``chat`` and ``models``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from p2pinfer.errors import P2PInferError

from .connect import SwarmAccess, quiet_logging, swarm_access, with_client
from .errors import EXIT_USAGE, CliError, explain
from .output import console, note, print_json, short_id, spinner, table, write

if TYPE_CHECKING:  # pragma: no cover
    from p2pinfer.client import Client, InferenceResponse

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
CHAT_HELP = "Commands: /exit or /quit (or Ctrl-D) leaves, /reset starts over, /help shows this."


def _generation_options(f: Any) -> Any:
    """The sampling options shared by ``prompt`` and ``chat``."""
    for option in reversed([
        click.option("-m", "--model", help="Model name or alias (default: the swarm's default)."),
        click.option("-s", "--system", help="A system prompt."),
        click.option("--max-tokens", type=click.IntRange(min=1),
                     help="Longest answer, in tokens (default: the worker's, 256)."),
        click.option("-t", "--temperature", type=click.FloatRange(0.0, 2.0),
                     help="0 for the most likely answer (repeatable), up to 2."),
        click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1),
                     help="Sampling seed, for repeatable answers."),
    ]):
        f = option(f)
    return f


def _read_prompt(text: str | None) -> str:
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    if text is None:
        raise click.UsageError("give a prompt, or '-' to read it from stdin")
    if not text.strip():
        raise CliError("the prompt is empty", EXIT_USAGE)
    return text


def _answer_format(choice: str | None, schema: Any) -> str | dict[str, Any] | None:
    """``--format json`` or ``--schema FILE`` as the SDK's ``format``."""
    if choice is not None and schema is not None:
        raise click.UsageError("give --format or --schema, not both")
    if schema is None:
        return choice
    import json

    try:
        value = json.loads(schema.read())
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--schema") from None
    if not isinstance(value, dict):
        raise click.BadParameter("a JSON schema is an object", param_hint="--schema")
    return value


def _read_tools(files: tuple[Any, ...]) -> list[dict[str, Any]] | None:
    """``--tool FILE`` (repeatable): each file one function definition (or a
    list of them), in p2pinfer's or OpenAI's shape."""
    if not files:
        return None
    import json

    tools: list[dict[str, Any]] = []
    for f in files:
        try:
            value = json.loads(f.read())
        except ValueError as exc:
            raise click.BadParameter(f"{f.name}: not JSON: {exc}", param_hint="--tool") from None
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(t, dict) for t in items):
            raise click.BadParameter(f"{f.name}: a tool is an object with a name",
                                     param_hint="--tool")
        tools.extend(items)
    return tools


def _print_calls(response: InferenceResponse) -> None:
    """The tool calls an answer made, one line each: name and arguments."""
    for call in response.tool_calls:
        write(f"{call.name}({call.arguments})\n")


def _summary(response: InferenceResponse) -> str:
    usage = response.usage
    parts = [response.model or "?"]
    if response.worker:
        parts.append(f"worker {short_id(response.worker)}")
    if usage:
        parts.append(f"{usage.get('prompt_tokens', 0)} prompt + "
                     f"{usage.get('completion_tokens', 0)} completion tokens")
    if response.latency_ms is not None:
        parts.append(f"{response.latency_ms:.0f} ms")
    if response.cached:
        parts.append("cached")
    return " · ".join(parts)


@click.command(context_settings=CONTEXT)
@click.argument("text", required=False)
@_generation_options
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole answer and its metadata as JSON when done.")
@click.option("--format", "answer_format", type=click.Choice(["json"]),
              help="Constrain the answer to a JSON object.")
@click.option("--schema", type=click.File("r"), metavar="FILE",
              help="Constrain the answer to this JSON schema ('-': stdin).")
@click.option("--raw", is_flag=True,
              help="Continue TEXT as it is, without the model's chat template.")
@click.option("--tool", "tool_files", type=click.File("r"), multiple=True, metavar="FILE",
              help="A function the model may call (JSON: name, description, parameters); "
                   "repeatable. Calls are printed as name(arguments).")
@click.option("--tool-choice", metavar="CHOICE",
              help="auto (default), none, required, or the name of the tool to call.")
@click.option("--logprobs", "top_logprobs", type=click.IntRange(0, 20), metavar="N",
              help="With --json: each token's log probability and its N most likely "
                   "alternatives (0-20).")
@click.option("-v", "--verbose", is_flag=True,
              help="Print the model, worker, token counts and latency on stderr.")
@swarm_access()
def prompt(text: str | None, model: str | None, system: str | None, max_tokens: int | None,
           temperature: float | None, seed: int | None, as_json: bool,
           answer_format: str | None, schema: Any, raw: bool, tool_files: tuple[Any, ...],
           tool_choice: str | None, top_logprobs: int | None, verbose: bool,
           access: SwarmAccess) -> None:
    """Ask the swarm one question; the answer is printed as it is generated.

    TEXT '-' (or no TEXT with piped input) reads the prompt from stdin.

    \b
    Examples:
      p2pinfer prompt "Explain peer-to-peer networks in one sentence."
      p2pinfer prompt -m smollm2 --max-tokens 64 -t 0 "Name three colors."
      git diff | p2pinfer prompt -s "Review this patch." -
      p2pinfer prompt --json "Hello" | jq .usage
      p2pinfer prompt --schema city.json "Describe Oslo." | jq .population
      p2pinfer prompt --raw "The capital of France is"
      p2pinfer prompt --tool weather.json "Is it raining in Oslo?"
    """
    import trio

    fmt = _answer_format(answer_format, schema)
    tools = _read_tools(tool_files)
    if tool_choice is not None and tools is None:
        raise click.UsageError("--tool-choice needs --tool")
    if top_logprobs is not None and not as_json:
        raise click.UsageError("--logprobs needs --json (they are printed with the answer)")
    text = _read_prompt(text)

    async def body(client: Client) -> InferenceResponse:
        with spinner("Waiting for the first token…") as spin:
            async with client.stream(text, model=model, system=system, max_tokens=max_tokens,
                                     temperature=temperature, seed=seed,
                                     format=fmt, raw=raw, tools=tools,
                                     tool_choice=tool_choice,
                                     logprobs=top_logprobs is not None,
                                     top_logprobs=top_logprobs or None) as stream:
                first = True
                async for delta in stream:
                    if first:
                        spin.stop()
                        access.lift_deadline()  # tokens flow: no ceiling on the rest
                        first = False
                    if not as_json:
                        write(delta)
        assert stream.response is not None
        return stream.response

    response = trio.run(with_client, access, "any", body)
    if as_json:
        print_json(response.to_dict())
        return
    if not response.text.endswith("\n") and (response.text or not response.tool_calls):
        write("\n")
    _print_calls(response)
    if verbose:
        note(f"[dim]{_summary(response)}[/]")


class _History:
    """readline history for ``chat``, kept in the config dir (mode 0600)."""

    def __init__(self, access: SwarmAccess) -> None:
        self.path = access.store.history_path
        try:
            import readline
        except ImportError:  # pragma: no cover - no readline on this platform
            self.readline: Any = None
            return
        self.readline = readline
        if sys.stdin.isatty():
            try:
                readline.read_history_file(self.path)
            except OSError:
                pass
            readline.set_history_length(1000)

    def save(self) -> None:
        if self.readline is None or not sys.stdin.isatty():
            return
        from .store import write_private

        if not self.path.exists():
            write_private(self.path, "")
        try:
            self.readline.write_history_file(self.path)
        except OSError:
            pass


@click.command(context_settings=CONTEXT)
@_generation_options
@swarm_access()
def chat(model: str | None, system: str | None, max_tokens: int | None,
         temperature: float | None, seed: int | None, access: SwarmAccess) -> None:
    """Chat with a model; the whole conversation goes with each message.

    Type /exit (or Ctrl-D) to leave and /reset to start over. Ctrl-C stops
    an answer that is being written; at the prompt it leaves. Lines you
    type are kept in the config dir's chat_history (arrow keys recall them).

    \b
    Examples:
      p2pinfer chat
      p2pinfer chat -m smollm2 -s "You answer in one sentence."
    """
    from p2pinfer.client import SyncClient

    kwargs = access.client_kwargs("any")
    quiet_logging()
    history = _History(access)
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    interactive = sys.stdin.isatty()
    if interactive:
        note(f"[dim]Chatting through {access.where}. {CHAT_HELP}[/]")
    with SyncClient(**kwargs) as client:
        try:
            while True:
                try:
                    line = input(">>> " if interactive else "")
                except EOFError:
                    if interactive:
                        click.echo()
                    break
                command = line.strip()
                if not command:
                    continue
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    messages = messages[:1] if system else []
                    note("[dim]Conversation cleared.[/]")
                    continue
                if command in ("/help", "/?"):
                    note(CHAT_HELP)
                    continue
                messages.append({"role": "user", "content": line})
                answer = _chat_turn(client, access, messages, model=model,
                                    max_tokens=max_tokens, temperature=temperature, seed=seed)
                if answer is None:
                    messages.pop()
                else:
                    messages.append({"role": "assistant", "content": answer})
        finally:
            history.save()


def _chat_turn(client: Any, access: SwarmAccess, messages: list[dict[str, str]],
               **options: Any) -> str | None:
    """Stream one answer; None when it failed or was interrupted."""
    if access.creds.token and access.creds.refresh_token:
        client.run(access.fresh_session)
    stream = client.stream(messages=list(messages), **options)
    parts: list[str] = []
    try:
        with spinner("Thinking…") as spin:
            for delta in stream:
                if not parts:
                    spin.stop()
                parts.append(delta)
                write(delta)
    except KeyboardInterrupt:
        stream.close()
        write("\n")
        note("[dim](answer stopped)[/]")
        return None
    except P2PInferError as exc:
        if parts:
            write("\n")
        click.echo(f"Error: {explain(exc)}", err=True)
        return None
    text = "".join(parts)
    if not text.endswith("\n"):
        write("\n")
    return text


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@swarm_access()
def models(as_json: bool, access: SwarmAccess) -> None:
    """List the models the swarm serves, with workers, free slots and what runs them.

    The runner column says how local models run on their workers: llama.cpp's
    server, the CPU features it uses, and whether weights are repacked for
    the CPU (off on AMX CPUs and after a crash).

    \b
    Examples:
      p2pinfer models
      p2pinfer models --json
    """
    import trio

    found = trio.run(with_client, access, "any", lambda c: c.models())
    if as_json:
        print_json(found)
        return
    rows = [(m["name"], ", ".join(m.get("aliases") or []), m.get("backend"), m.get("workers"),
             m.get("free_slots"), m.get("queue_depth"), m.get("status"),
             m.get("context_length"), ", ".join(m.get("capabilities") or ["chat"]),
             "; ".join(m.get("runners") or []) or "-")
            for m in found]
    console().print(table(f"{len(found)} model(s)",
                          ["model", "aliases", "backend", "workers", "free slots", "queued",
                           "status", "context", "can", "runner"], rows,
                          justify={k: "right" for k in ("workers", "free slots", "queued",
                                                        "context")}))
    if not found:
        note("No worker serves a model yet: start one with "
             "`p2pinfer daemon --roles inference --bootstrap ...`.")


@click.command(context_settings=CONTEXT)
@click.argument("texts", nargs=-1)
@click.option("-m", "--model", help="An embedding model (default: the gateway's, all-minilm).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {model, usage, embeddings} as JSON instead of one line per text.")
@swarm_access()
def embed(texts: tuple[str, ...], model: str | None, as_json: bool,
          access: SwarmAccess) -> None:
    """Embed texts: one vector per TEXT (or per line of stdin with '-').

    Each vector is printed as a JSON list on its own line, in order; the
    vectors are unit length, so their dot product is the cosine similarity.

    \b
    Examples:
      p2pinfer embed "The cat sat on the mat." "A kitten rests on a rug."
      cat sentences.txt | p2pinfer embed - > vectors.jsonl
      p2pinfer embed --json "hello" | jq '.embeddings[0] | length'
    """
    import json

    import trio

    items = list(texts)
    if items == ["-"] or (not items and not sys.stdin.isatty()):
        items = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not items:
        raise click.UsageError("give texts to embed, or '-' to read them from stdin")
    result = trio.run(with_client, access, "any", lambda c: c.embed(items, model=model))
    if as_json:
        print_json({"model": result.model, "usage": result.usage,
                    "embeddings": result.vectors})
        return
    for vector in result.vectors:
        write(json.dumps(vector) + "\n")


COMMANDS = [prompt, chat, models, embed]
