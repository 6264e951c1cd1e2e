"""Structured logs: JSON lines with the request id, the node and extra=
fields, and one request id seen in the logs of the calling node and of the
node that served the call."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.logs import JsonFormatter, configure_logging
from p2pinfer import errors
from p2pinfer.metrics import catalogue as cat
from p2pinfer.tracing import RequestIdFilter, current_request_id

from .helpers import make_network, node_config, run_nodes, wait_for


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Capture every log record as JSON lines (restoring the root logger after)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def test_json_lines_carry_request_id_node_and_extra_fields() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(level="INFO", fmt="json", node="node-a", stream=out)
        token = current_request_id.set("req-42")
        try:
            logging.getLogger("p2pinfer.test").info(
                "served %s", "x", extra={"model": "smollm2", "latency_ms": 12.5,
                                         "path": Path("/tmp")})
        finally:
            current_request_id.reset(token)
        logging.getLogger("p2pinfer.test").warning("no request")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["msg"] == "served x" and first["request_id"] == "req-42"
    assert first["node"] == "node-a" and first["level"] == "info"
    assert first["model"] == "smollm2" and first["latency_ms"] == 12.5
    assert first["path"] == "/tmp"  # not JSON-able: written as text
    assert second["request_id"] == "-" and "model" not in second


async def test_request_id_follows_a_call_across_nodes(
        tmp_path: Path, nursery: trio.Nursery, json_lines: io.StringIO) -> None:
    homes = make_network(tmp_path, ["m", "c"])
    with trio.fail_after(40):
        async with run_nodes(nursery, [node_config(homes[0], roles=["metrics"], tables={
                "metrics": {"prometheus_port": 0}})]) as (m,):
            async with run_nodes(nursery, [node_config(homes[1], roles=[],
                                                       bootstrap=[m.addrs[0]])]) as (c,):
                await wait_for(lambda: m.is_member(c.peer_id) and c.is_member(m.peer_id),
                               limit=20)
                caller = logging.getLogger("p2pinfer.test.caller")
                token = current_request_id.set("req-trace-7")
                try:
                    caller.info("recording a metric", extra={"peer": m.peer_id})
                    with pytest.raises(errors.InvalidParams):
                        await c.rpc.call(m.peer_id, "recordMetric",
                                         {"metricName": cat.REQUESTS, "value": 1,
                                          "labels": {}})
                finally:
                    current_request_id.reset(token)
    lines = [r for r in records(json_lines) if r["request_id"] == "req-trace-7"]
    by_logger = {r["logger"]: r for r in lines}
    assert by_logger["p2pinfer.test.caller"]["peer"] == m.peer_id
    served = by_logger["p2pinfer.metrics.role"]
    assert "recordMetric from" in served["msg"] and served["peer"] == c.peer_id
    assert served["rpc_method"] == "recordMetric" and served["field"] == "labels"


async def test_one_request_id_in_the_gateway_and_the_worker_logs(
        json_lines: io.StringIO, tmp_path: Path, nursery: trio.Nursery) -> None:
    """A client's request through a gateway to a worker on another node: the
    gateway's log line and the worker's carry the same request id, the one
    the client got back."""
    from .test_gateway import new_user_with_key, start, synthetic

    roles = [["auth", "gateway"], ["inference"]]
    homes = make_network(tmp_path, ["gw", "worker"], roles=roles)
    gw, worker = await start(nursery, homes, roles, tables=synthetic(tokens=4))
    with trio.fail_after(60):
        creds = await new_user_with_key(gw)
        await wait_for(lambda: gw.discovery.find_model("fake"))
        async with gw.rpc.stream(gw.peer_id, "processInferenceRequest",
                                 {"request": {"prompt": "hi", "model": "fake"},
                                  "auth": {"api_key": creds["api_key"]}}) as s:
            async for _ in s:
                pass
        rid = s.trailer["request_id"]
        assert s.trailer["worker"] == worker.peer_id

        def lines_of(logger: str) -> list[dict[str, Any]]:
            return [r for r in records(json_lines)
                    if r["logger"] == logger and r["request_id"] == rid]

        await wait_for(lambda: lines_of("p2pinfer.gateway.role")
                       and lines_of("p2pinfer.inference.role"))
        assert "request success" in lines_of("p2pinfer.gateway.role")[0]["msg"]
        assert "answered with fake" in lines_of("p2pinfer.inference.role")[0]["msg"]
    gw.stop()
    worker.stop()
