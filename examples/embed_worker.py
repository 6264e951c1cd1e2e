"""Embed a p2pinfer worker inside your own Python application.

The application here is a small web service of its own (Starlette on
Hypercorn: ``GET /status`` shows what its worker is doing) that also runs a
p2pinfer :class:`~p2pinfer.Node` with only the inference role, joined to a
swarm with a join token. It adds an RPC method of its own to the node
(``appInfo``, for network members): a custom role is any object with
``rpc_*`` methods registered on ``node.rpc_server``.

In production, on the machine that lends its CPU (the swarm's owner ran
``p2pinfer network admit <peer id> --roles inference`` and sent the token)::

    python examples/embed_worker.py --home ./worker-home --join-token p2pj1... --port 8081

Self-contained (what CI runs): ``--demo`` also starts a hub (auth, gateway)
in this process, admits the app's node with a join token, sends a request
through the hub that the embedded worker answers, reads ``/status`` and the
custom RPC method, and exits::

    python examples/embed_worker.py --demo
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from p2pinfer import Client, Node, NodeConfig, P2PInferError
from p2pinfer.rpc import Access, CallContext, rpc_method


class AppInfo:
    """The application's own RPC methods, served by the embedded node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.asked = 0

    @rpc_method("appInfo", access=Access.MEMBER)
    async def rpc_app_info(self, ctx: CallContext, params: Any) -> dict[str, Any]:
        """Who runs this worker (members of the network only)."""
        self.asked += 1
        return {"app": self.name, "asked": self.asked, "caller": ctx.peer_id}


def status_app(node: Node, info: AppInfo) -> Any:
    """The application's web service: its own routes, next to the worker."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(request: Any) -> JSONResponse:
        inference = node.roles["inference"].describe()
        return JSONResponse({"app": info.name, "peer_id": node.peer_id,
                             "models": inference["models"],
                             "in_flight": inference["in_flight"]})

    return Starlette(routes=[Route("/status", status)])


async def serve_http(app: Any, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Serve ``app`` on 127.0.0.1:``port``; reports the bound URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config))
        task_status.started(str(binds[0]))


def worker_config(home: Path, bootstrap: list[str]) -> NodeConfig:
    """An inference-only node serving the embedded model with one slot."""
    return NodeConfig.from_mapping({
        "node": {"home": str(home), "roles": ["inference"], "bootstrap": bootstrap,
                 "listen": ["/ip4/127.0.0.1/tcp/0"], "announce_interval": 1.0},
        "inference": {"slots": 1},
    }, env={})


async def run_app(home: Path, bootstrap: list[str], port: int, *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The application: its worker node and its web service, until cancelled."""
    info = AppInfo("embed-example")
    node = Node(worker_config(home, bootstrap))
    node.rpc_server.register(info)  # the app's own RPC methods
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        url = await nursery.start(serve_http, status_app(node, info), port)
        # The model loads in its own llama.cpp process; say so once it answers.
        await node.roles["inference"].engine.wait_settled()
        print(f"app: worker {node.peer_id} serving; status on {url}/status")
        task_status.started((node, url))


async def demo(limit: float) -> None:
    import httpx

    from p2pinfer import Identity
    from p2pinfer.ledger.membership import (
        admit,
        import_join_token,
        load_owner,
        make_join_token,
    )
    from p2pinfer.swarm import LocalSwarm

    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(limit):
        base = Path(tmp)
        tables = {"auth": {"registration_wait": 0},
                  "node": {"announce_interval": 1.0, "descriptor_ttl": 1.0}}
        async with LocalSwarm(base / "swarm", {"hub": ["auth", "gateway"]},
                              tables=tables) as swarm, trio.open_nursery() as nursery:
            hub = swarm.first
            # The owner admits the app's node; the app imports the token
            # (what `p2pinfer network admit` / `network join` do).
            app_home = base / "app"
            owner = load_owner(swarm.homes["hub"])
            assert owner is not None
            peer_id = Identity.load_or_create(app_home).peer_id
            token = make_join_token(owner.network, admit(owner, peer_id, ["inference"]),
                                    [hub.addrs[0]])
            import_join_token(app_home, token, peer_id=peer_id)

            node, url = await nursery.start(run_app, app_home, [hub.addrs[0]], 0)
            async with Client(bootstrap=[hub.addrs[0]]) as setup:
                await setup.register("ada", "ada@example.com", "correct horse 42")
                await setup.login("ada", password="correct horse 42")
                key = (await setup.create_api_key("example"))["api_key"]
            async with Client(bootstrap=[hub.addrs[0]], api_key=key) as client:
                await client.wait_for_model()  # until the hub has heard of our worker
                answer = await client.inference("Say hello in five words.", max_tokens=24)
            assert answer.worker == node.peer_id
            print(f"hub -> embedded worker: {answer.text.strip()!r}")

            print(f"custom RPC from the hub: {await hub.rpc.call(node.peer_id, 'appInfo')}")
            async with httpx.AsyncClient() as http:
                status = (await http.get(f"{url}/status")).json()
            model = status["models"][0]
            print(f"app /status: {model['name']} {model['status']}, "
                  f"{model['free_slots']} free slot(s)")
            nursery.cancel_scope.cancel()


async def production(home: Path, token: str | None, bootstrap: list[str], port: int) -> None:
    from p2pinfer.ledger.membership import import_join_token, load_network

    if token:
        from p2pinfer import Identity

        import_join_token(home, token, peer_id=Identity.load_or_create(home).peer_id)
    network = load_network(home)
    if network is None:
        raise SystemExit(f"{home} has joined no network: pass --join-token")
    async with trio.open_nursery() as nursery:
        await nursery.start(run_app, home, bootstrap or list(network.bootstrap), port)


def main() -> int:
    import libp2p  # noqa: F401  (import first: its import resets its logger)

    logging.getLogger("libp2p").addHandler(logging.NullHandler())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="a throwaway swarm, then exit")
    parser.add_argument("--home", type=Path, default=Path("worker-home"))
    parser.add_argument("--join-token", help="from `p2pinfer network admit` on the owner")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--port", type=int, default=8081, help="the app's own HTTP port")
    parser.add_argument("--timeout", type=float, default=180.0, help="--demo gives up after")
    args = parser.parse_args()
    failed = False
    try:
        if args.demo:
            trio.run(demo, args.timeout)
        else:
            trio.run(production, args.home, args.join_token, args.bootstrap, args.port)
    except* P2PInferError as group:
        for exc in group.exceptions:
            print(f"error: {exc}", file=sys.stderr)
        failed = True
    except* KeyboardInterrupt:
        pass
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
