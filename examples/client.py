"""A client of a p2pinfer swarm: the SDK in the shape of the design document.

Against your swarm (peer-to-peer through a bootstrap node, or HTTP to a web
node), with an API key::

    python examples/client.py --bootstrap /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW... --api-key p2p_...
    python examples/client.py --url http://127.0.0.1:3000 --api-key p2p_...
    P2PINFER_BOOTSTRAP=... P2PINFER_API_KEY=... python examples/client.py

Self-contained (what CI runs): ``--demo`` starts a throwaway swarm in this
process (a hub and a worker with the embedded model, in a temporary
directory), registers a user, and runs the same client code against it::

    python examples/client.py --demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import trio

from p2pinfer import Client, P2PInferError


async def use_the_swarm(client: Client) -> None:
    """What a client program does: ask, stream, and check its usage."""
    # One whole answer (the design document's SDK example).
    response = await client.inference(prompt="Explain quantum computing in one sentence.",
                                      max_tokens=60)
    print(f"answer: {response.text.strip()}")
    print(f"        ({response.model} on worker {response.worker}, "
          f"{response.usage.get('total_tokens')} tokens, {response.latency_ms} ms)")

    # The same, streamed: text arrives as it is generated.
    print("stream: ", end="", flush=True)
    async with client.stream(prompt="Write a two-line poem about AI.", max_tokens=40) as stream:
        async for text in stream:
            print(text, end="", flush=True)
    print()

    # What the swarm serves, and what this key may still do this hour.
    for model in await client.models():
        print(f"model:  {model['name']} ({model['workers']} worker(s), {model['status']})")
    quota = await client.quota()
    print(f"quota:  {quota['usage']['requests']} of {quota['limits']['requests']} requests "
          f"used this {quota['window']}")


async def demo(limit: float) -> None:
    """Start a throwaway swarm, make a user with an API key, run the client."""
    from p2pinfer.swarm import LocalSwarm

    layout = {"hub": ["auth", "gateway"], "worker": ["inference"]}
    tables = {"auth": {"registration_wait": 0}, "inference": {"slots": 1},
              "node": {"announce_interval": 1.0, "descriptor_ttl": 1.0}}
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(limit):
        async with LocalSwarm(Path(tmp), layout, tables=tables) as swarm:
            hub = swarm.first
            print(f"demo swarm: hub {hub.addrs[0]}")
            # A user and an API key, made through the public SDK calls.
            async with Client(bootstrap=[hub.addrs[0]]) as setup:
                await setup.register("ada", "ada@example.com", "correct horse 42")
                await setup.login("ada", password="correct horse 42")
                key = (await setup.create_api_key("example"))["api_key"]
            async with Client(bootstrap=[hub.addrs[0]], api_key=key) as client:
                await client.wait_for_model()  # the worker is loading the model
                await use_the_swarm(client)


async def connect(bootstrap: list[str], url: str | None, api_key: str | None,
                  limit: float) -> None:
    with trio.fail_after(limit):
        async with Client(bootstrap=bootstrap or None, base_url=url, api_key=api_key) as client:
            await use_the_swarm(client)


def quiet_libp2p() -> None:
    """py-libp2p logs ordinary events (a peer going away) as errors: keep them
    off the terminal. Import it first: its import resets its logger."""
    import libp2p  # noqa: F401

    logging.getLogger("libp2p").addHandler(logging.NullHandler())


def main() -> int:
    quiet_libp2p()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", action="append", default=[],
                        help="a node's multiaddr (repeatable; env P2PINFER_BOOTSTRAP)")
    parser.add_argument("--url", default=os.environ.get("P2PINFER_URL"),
                        help="a web node's URL (env P2PINFER_URL)")
    parser.add_argument("--api-key", default=os.environ.get("P2PINFER_API_KEY"),
                        help="your API key (env P2PINFER_API_KEY)")
    parser.add_argument("--demo", action="store_true",
                        help="start a throwaway local swarm and use it")
    parser.add_argument("--timeout", type=float, default=180.0, help="give up after this")
    args = parser.parse_args()
    failed = False
    try:
        if args.demo:
            trio.run(demo, args.timeout)
        else:
            trio.run(connect, args.bootstrap, args.url, args.api_key, args.timeout)
    except* P2PInferError as group:  # a nursery may wrap it: except* unwraps
        for exc in group.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        failed = True
    except* trio.TooSlowError:
        print(f"error: no answer within {args.timeout} s", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
