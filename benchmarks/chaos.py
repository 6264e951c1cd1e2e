"""Longer reliability runs than CI's, on the harness of tests/chaos_harness.py.

Five daemons (two gateways with auth, three synthetic workers) as OS
processes, each in its own network namespace when this machine permits it
(run as root), else on loopback. Prints ONE JSON object.

    load   1,000 concurrent clients through two gateways, N rounds: errors,
           requests/s, peak in flight, resident and heap memory of every daemon
           per round with the least-squares slope, usage on every node.
    soak   clients asking continuously for M minutes while a fault is thrown
           every few seconds (SIGKILL or SIGTERM and restart of a worker or a
           gateway, a worker's link cut and restored, a link between the two
           gateways blackholed and restored); then everything is healed and
           checked as the CI scenarios do: every request answered or refused
           with a clear error, identical events on every node, each request's
           usage row equal to what its client saw.

Usage:
    python benchmarks/chaos.py load [--rounds 40] [--clients 1000]
    python benchmarks/chaos.py soak [--minutes 5] [--fault-every 4] [--seed 1]
    python benchmarks/chaos.py soak --quick        # one minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from p2pinfer import errors

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import machine  # noqa: E402

from tests.chaos_harness import ask, netns_unavailable_reason, synthetic  # noqa: E402
from tests.test_reliability_faults import (  # noqa: E402
    check_ledgers,
    gateway_table,
    settle,
    stop_and_read,
    swarm,
)
from tests.test_reliability_load import run_load  # noqa: E402

# What a client may see while faults are thrown; anything else is a failure.
CLEAR_ERRORS = {"StreamInterrupted", "PeerUnavailable", "StreamBroken", "Cancelled",
                "NoWorkerAvailable", "DeadlineExceeded"}


async def soak(base: Path, minutes: float, fault_every: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    namespaces = netns_unavailable_reason() is None
    tables = {"models": [synthetic(tokens=10, token_delay=0.02)],
              "gateway": gateway_table(10**9, request_timeout=30)}
    out: dict[str, Any] = {"minutes": minutes, "fault_every_s": fault_every, "seed": seed,
                           "namespaces": namespaces}
    faults: Counter[str] = Counter()
    killed_gateways: set[str] = set()
    async with swarm(base, tables, limit=10**9) as s:
        outcomes: list[Any] = []
        stop_at = trio.current_time() + minutes * 60

        answered: Counter[str] = Counter()

        async def client(c: int) -> None:
            """Asks its gateway; a request its gateway never received
            (PeerUnavailable) goes to the other one at once, as the SDK does."""
            i = 0
            gateways = list(s.gateways.values())
            gw = gateways[c % 2]
            while trio.current_time() < stop_at:
                o = await ask(s.peer.rpc, gw, s.key, f"soak {c} {i}", limit=120)
                outcomes.append(o)
                if isinstance(o.error, errors.PeerUnavailable):
                    gw = gateways[(gateways.index(gw) + 1) % 2]
                    o = await ask(s.peer.rpc, gw, s.key, f"soak {c} {i} again", limit=120)
                    outcomes.append(o)
                answered["ok" if o.ok else "error"] += 1
                i += 1
                if not o.ok:
                    await trio.sleep(0.2)  # a client backs off after an error

        async def chaos() -> None:
            topology = s.cluster.topology
            while trio.current_time() + fault_every < stop_at:
                await trio.sleep(fault_every)
                choices = ["kill-worker", "restart-worker", "kill-gateway", "restart-gateway"]
                if namespaces:
                    choices += ["partition-worker", "split-gateways"]
                fault = rng.choice(choices)
                faults[fault] += 1
                worker = rng.choice(["w1", "w2", "w3"])
                gateway = rng.choice(["g1", "g2"])
                node = s.cluster.nodes[worker if "worker" in fault else gateway]
                if fault.startswith("kill"):
                    node.kill()
                    if "gateway" in fault:
                        killed_gateways.add(gateway)
                    await trio.to_thread.run_sync(s.cluster.restart, node.name)
                elif fault.startswith("restart"):
                    node.terminate()
                    if "gateway" in fault:
                        killed_gateways.add(gateway)
                    await trio.to_thread.run_sync(s.cluster.restart, node.name)
                elif fault == "partition-worker":
                    topology.partition(s.cluster.index(worker))  # type: ignore[union-attr]
                    await trio.sleep(fault_every)
                    topology.heal(s.cluster.index(worker))  # type: ignore[union-attr]
                else:  # the two gateways cannot reach each other; clients reach both
                    a, b = s.cluster.index("g1"), s.cluster.index("g2")
                    topology.block(a, b)  # type: ignore[union-attr]
                    await trio.sleep(fault_every)
                    topology.unblock(a, b)  # type: ignore[union-attr]

        async with trio.open_nursery() as nursery:
            for c in range(24):
                nursery.start_soon(client, c)
            nursery.start_soon(chaos)
        kinds = Counter(o.kind for o in outcomes)
        out["faults"] = dict(faults)
        out["requests"] = len(outcomes)
        out["outcomes"] = dict(kinds)
        out["unexplained_errors"] = sum(n for k, n in kinds.items()
                                        if k != "ok" and k not in CLEAR_ERRORS)
        # per request as its user saw it (after the one retry on the other gateway)
        out["user_requests"] = sum(answered.values())
        out["availability"] = round(answered["ok"] / max(1, sum(answered.values())), 5)
        await settle(s)
        ledgers = await trio.to_thread.run_sync(stop_and_read, s)
        # requests cut by a gateway going down may or may not be recorded
        cut = set(killed_gateways)
        reconcile = [o for o in outcomes if o.kind in {"ok", *CLEAR_ERRORS}]
        try:
            requests, tokens = check_ledgers(s, ledgers, reconcile, cut=cut)
            out["ledger"] = {"identical_on_every_node": True, "usage_requests": requests,
                             "usage_tokens": tokens, "usage_exact": True}
        except AssertionError as exc:
            out["ledger"] = {"check_failed": str(exc)[:500]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_load = sub.add_parser("load")
    p_load.add_argument("--rounds", type=int, default=40)
    p_load.add_argument("--clients", type=int, default=1000)
    p_soak = sub.add_parser("soak")
    p_soak.add_argument("--minutes", type=float, default=5.0)
    p_soak.add_argument("--fault-every", type=float, default=4.0)
    p_soak.add_argument("--seed", type=int, default=1)
    p_soak.add_argument("--quick", action="store_true", help="one minute")
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        if args.command == "load":
            out = trio.run(lambda: run_load(Path(tmp), clients=args.clients,
                                            rounds=args.rounds))
            out.pop("exit_codes", None)
        else:
            minutes = 1.0 if args.quick else args.minutes
            out = trio.run(soak, Path(tmp), minutes, args.fault_every, args.seed)
    out["command"] = " ".join(["python benchmarks/chaos.py", *sys.argv[1:]])
    out["machine"] = machine()
    out["pid"] = os.getpid()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
