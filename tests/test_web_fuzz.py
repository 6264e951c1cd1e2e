"""A property-based fuzzer against the OpenAPI document: Schemathesis
(``schemathesis run``, unchanged) generates valid and invalid requests for
every operation of ``/openapi.json`` and checks that none gets a 5xx.

Bounded: a fixed seed, a fixed number of examples per operation (a few
hundred requests in all) and a time budget. The node serves the synthetic
model, so every valid inference request really runs; the report (JUnit)
goes to ``test-artifacts/web-fuzz/``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from .test_web_support import FAKE, artifact_dir, web_swarm

EXAMPLES = 20  # per operation; ~23 operations, plus the coverage phase's cases
SEED = 20240817


async def test_no_generated_request_gets_a_server_error(tmp_path: Path,
                                                        nursery: trio.Nursery) -> None:
    report = artifact_dir("web-fuzz")
    cli = Path(sys.executable).parent / "schemathesis"
    with trio.fail_after(200):
        # the synthetic model answers to the name the document's examples use;
        # the gateway's default model ("default") is served by nobody
        async with web_swarm(nursery, tmp_path, models=[{**FAKE, "aliases": ["smollm2"]}],
                             gateway={"default_rate_limit": 1_000_000,
                                                         "concurrent_per_key": 0,
                                                         "concurrent_per_user": 0},
                             auth={"registrations_per_source": 1000,
                                   "max_failures_per_source": 1000}) as swarm:
            alice = await swarm.account("alice")
            command = [
                str(cli), "run", f"{swarm.url}/openapi.json",
                "--checks", "not_a_server_error",
                "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
                "--phases", "examples,coverage,fuzzing",
                "--request-timeout", "30", "--suppress-health-check", "all",
                # both credentials: each route takes the first kind it accepts
                "-H", f"X-API-Key: {alice.api_key}", "-H", f"Authorization: Bearer {alice.token}",
                # logging out would end the session the other operations use
                "--exclude-path", "/api/auth/logout",
                "--report", "junit", "--report-dir", str(report), "--no-color",
            ]
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                          check=False)
            swarm_served = swarm.node.roles["gateway"].served
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    (report / "output.txt").write_text(output)
    assert done.returncode == 0, output[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts is not None, output[-3000:]
    generated, passed = map(int, counts.groups())
    assert generated == passed and generated >= 300
    assert swarm_served > 10  # valid inference requests were generated and answered
