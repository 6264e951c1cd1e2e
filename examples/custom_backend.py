"""A model backend of your own, served by a p2pinfer worker like any model.

:class:`CalculatorBackend` subclasses :class:`p2pinfer.inference.Backend`: it
answers arithmetic ("What is 12 * (3 + 4)?") by evaluating the expression
safely, and streams the answer token by token with exact token counts. A
worker serves it through a role factory (``Node(config,
role_factories={"inference": ...})``): the inference role is built as usual
(here with the embedded model turned off) and the backend is added to its
engine, next to or instead of the configured models. Gateways then route
``model="calculator"`` requests to it, with auth, rate limits and usage
accounting as for any model.

Runs to completion by itself (a hub and the worker in this process, a
temporary directory)::

    python examples/custom_backend.py
"""

from __future__ import annotations

import argparse
import ast
import logging
import operator
import sys
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pinfer import Client, P2PInferError
from p2pinfer.errors import InvalidParams
from p2pinfer.inference import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ModelState,
    TextChunk,
)

if TYPE_CHECKING:
    from p2pinfer.context import RoleContext
    from p2pinfer.inference.role import InferenceRole

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}


def evaluate(text: str) -> float:
    """The value of the arithmetic in ``text`` (numbers, + - * / % // ** and
    brackets only; never ``eval``).

    Raises:
        InvalidParams: no arithmetic expression in the text.
    """
    expression = "".join(ch for ch in text if ch in "0123456789.+-*/%() ").strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise InvalidParams(f"not an arithmetic expression: {expression!r}") from None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(value(node.right)) > 100:
                raise InvalidParams("exponent too large")
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise InvalidParams(f"not an arithmetic expression: {expression!r}")

    try:
        return value(tree)
    except ZeroDivisionError:
        raise InvalidParams("division by zero") from None


class CalculatorBackend(Backend):
    """Answers arithmetic questions; one token per word of the answer."""

    kind = "calculator"

    def __init__(self, name: str = "calculator", *, slots: int = 4) -> None:
        super().__init__(name, slots=slots)
        self.context_length = 1024

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # A real backend loads its model or opens its HTTP client here.
        self._set_state(ModelState.LOADED)
        task_status.started()
        await trio.sleep_forever()

    async def list_models(self) -> list[ModelInfo]:
        return [self.info()]

    async def generate(self, request: GenerationRequest
                       ) -> AsyncGenerator[TextChunk | GenerationResult, None]:
        question = request.messages[-1].content
        result = evaluate(question)
        shown = f"{result:g}" if isinstance(result, float) else str(result)
        words = f"The answer is {shown}.".split(" ")
        words = words[: request.params.max_tokens]
        for i, word in enumerate(words):
            await trio.sleep(0.01)  # as if thinking: the client sees a stream
            yield TextChunk(word if i == 0 else " " + word)
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        finish = "length" if len(words) < len(f"The answer is {shown}.".split(" ")) else "stop"
        yield GenerationResult(prompt_tokens, len(words), finish)


def inference_with_calculator(node: RoleContext) -> InferenceRole:
    """The role factory: the usual inference role, plus our backend. It gets
    the node as a RoleContext, the one thing a role may use of its node."""
    from p2pinfer.inference.role import InferenceRole

    role = InferenceRole(node)
    role.engine.add_model(CalculatorBackend(), aliases=("calc",), default=True)
    return role


async def demo(limit: float) -> None:
    from p2pinfer import Node
    from p2pinfer.config import NodeConfig
    from p2pinfer.swarm import LocalSwarm, prepare_local_network

    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(limit):
        base = Path(tmp)
        # One network: a hub (run by LocalSwarm) and our worker (a Node we build).
        homes = prepare_local_network(base, {"hub": ["auth", "gateway"],
                                             "calc-worker": ["inference"]})
        tables = {"auth": {"registration_wait": 0},
                  "node": {"announce_interval": 1.0, "descriptor_ttl": 1.0}}
        async with LocalSwarm(base, {"hub": ["auth", "gateway"]}, tables=tables) as swarm, \
                trio.open_nursery() as nursery:
            hub = swarm.first
            config = NodeConfig.from_mapping({
                "node": {"home": str(homes["calc-worker"]), "roles": ["inference"],
                         "bootstrap": [hub.addrs[0]], "announce_interval": 1.0},
                "inference": {"embedded": False},  # serve only our backend
            }, env={})
            worker = Node(config, role_factories={"inference": inference_with_calculator})
            await nursery.start(worker.run)

            async with Client(bootstrap=[hub.addrs[0]]) as setup:
                await setup.register("ada", "ada@example.com", "correct horse 42")
                await setup.login("ada", password="correct horse 42")
                key = (await setup.create_api_key("example"))["api_key"]
            async with Client(bootstrap=[hub.addrs[0]], api_key=key) as client:
                await client.wait_for_model("calculator")  # the worker announces itself
                print("models:", [(m["name"], m["backend"]) for m in await client.models()])
                for question in ("What is 12 * (3 + 4)?", "And 2 ** 10 - 24?"):
                    print(f"{question} ", end="", flush=True)
                    async with client.stream(question, model="calculator") as stream:
                        async for text in stream:
                            print(text, end="", flush=True)
                    assert stream.response is not None
                    print(f"   ({stream.response.usage['completion_tokens']} tokens)")
                try:
                    await client.inference("What is love?", model="calc")
                except InvalidParams as exc:
                    print(f"What is love? -> refused: {exc.message}")
            nursery.cancel_scope.cancel()


def main() -> int:
    import libp2p  # noqa: F401  (import first: its import resets its logger)

    logging.getLogger("libp2p").addHandler(logging.NullHandler())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this")
    args = parser.parse_args()
    failed = False
    try:
        trio.run(demo, args.timeout)
    except* P2PInferError as group:
        for exc in group.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
