"""llama.cpp's own server (``llama-server``) as a supervised child process.

Why a child process: a native crash in llama.cpp (an out-of-bounds read in a
CPU kernel, the kernel's OOM killer) then ends the runner, not the node, and
llama-server batches every slot of a model in one context holding one copy
of the weights (continuous batching), which the in-process binding could not.

:class:`RunnerProcess` is one ``llama-server`` process:

- it listens on 127.0.0.1 only, on a port the kernel picks (read back from
  its log), and every request must carry a random API key given through the
  environment (never on the command line, which other local users can read);
- it is started from the thread that runs trio with ``PR_SET_PDEATHSIG``, so
  the kernel kills it when the node dies, SIGKILL included, and in a process
  group of its own, so a Ctrl-C on the terminal reaches the node only, which
  then stops it;
- its output goes to a pipe that a task reads line by line into the node's
  log (logger ``p2pinfer.inference.runner``), never to the terminal; the
  last lines are kept for error messages, and the lines that say what the
  runner is (CPU features, repacking, KV cache size, GPU offload) are parsed.

:func:`cpu_features` and :func:`repack_decision` choose whether llama.cpp may
repack weights into a CPU-specific layout ("extra buffer types"). On CPUs with
AMX, llama.cpp's AMX repacking at the pinned commit crashes on any batch of
more than one token (https://github.com/ggml-org/llama.cpp/issues/20824), so
there it is off; the supervisor in :mod:`.llamacpp` also turns it off when a
runner crashes during its warm-up, whatever the CPU.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import trio

from ..errors import ConfigError

__all__ = [
    "RunnerFacts",
    "RunnerFailed",
    "RunnerProcess",
    "cpu_features",
    "describe_exit",
    "find_llama_server",
    "repack_decision",
]

log = logging.getLogger(__name__)

LLAMA_SERVER = "llama-server"
LOG_TAIL = 60
_PR_SET_PDEATHSIG = 1

_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
_SYSTEM_INFO = re.compile(r"system_info: (.*)")
_KV_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_REPACK = re.compile(r"\b(AMX|CPU_[A-Z0-9_]+) model buffer size = +([\d.]+) MiB")
_DEVICE = re.compile(r"common_param: +- (\S+) +: (.*?)(?: \(\d+ MiB.*)?$")
_ALARMING = re.compile(r"\berror\b|\bfailed\b|\babort|segmentation|out of memory", re.I)


def find_llama_server(configured: str | None = None) -> Path:
    """The ``llama-server`` binary to run.

    In order: ``configured`` (``[inference] llama_server``), the one next to
    this Python interpreter (``scripts/setup.sh`` installs it into
    ``.venv/bin``), then ``PATH``.

    Raises:
        ConfigError: none found, or ``configured`` is not an executable file.
    """
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"inference.llama_server: not an executable file: {configured!r}")
        return path
    beside = Path(sys.executable).parent / LLAMA_SERVER
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(LLAMA_SERVER)
    if found:
        return Path(found)
    raise ConfigError(
        "llama-server was not found next to Python or on PATH: run scripts/setup.sh "
        "(or scripts/build_llama_server.sh DIR) or set [inference] llama_server")


def cpu_features() -> frozenset[str]:
    """The feature flags of this machine's CPU (``/proc/cpuinfo``; empty where
    there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def repack_decision(mode: str, features: frozenset[str]) -> tuple[bool, str]:
    """Whether a new runner repacks weights (``mode``: ``auto``, ``on``,
    ``off``), and why, in words for ``getModelStatus``."""
    if mode == "off":
        return False, "repacking is off in the configuration (inference.repack = \"off\")"
    if mode == "on":
        return True, "repacking is on in the configuration (inference.repack = \"on\")"
    amx = sorted(f for f in features if f.startswith("amx"))
    if amx:
        return False, (f"this CPU has AMX ({', '.join(amx)}), whose weight repacking in "
                       "this llama.cpp crashes on multi-token batches "
                       "(https://github.com/ggml-org/llama.cpp/issues/20824)")
    return True, "default: weights repacked for this CPU where llama.cpp can"


def describe_exit(returncode: int) -> str:
    """``SIGSEGV`` for a process killed by signal 11, ``exit code 1`` otherwise."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class RunnerFailed(Exception):
    """A runner did not come up: it exited, or was not healthy in time.
    ``returncode`` is set when it exited."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.returncode = returncode


@dataclass
class RunnerFacts:
    """What a runner's own log says about it."""

    url: str | None = None
    system_info: str | None = None
    # The CPU features llama.cpp reports using (AVX2, AMX_INT8, ...), from system_info.
    features: list[str] = field(default_factory=list)
    kv_cache_mib: float | None = None
    gpu_layers: tuple[int, int] | None = None  # (offloaded, total)
    devices: dict[str, str] = field(default_factory=dict)  # CPU, CUDA0, ... -> description
    repacked: dict[str, float] = field(default_factory=dict)  # buffer type -> MiB

    def gpus(self) -> list[str]:
        """The non-CPU devices the runner sees."""
        return [name for name in self.devices if name != "CPU"]

    def feed(self, line: str) -> None:
        if self.url is None and (m := _LISTENING.search(line)):
            self.url = m.group(1)
        elif m := _SYSTEM_INFO.search(line):
            self.system_info = m.group(1).strip()
            self.features = re.findall(r"\b([A-Z][A-Z0-9_]+) = 1\b", self.system_info)
        elif m := _KV_SIZE.search(line):
            self.kv_cache_mib = float(m.group(1))
        elif m := _DEVICE.search(line):
            self.devices[m.group(1)] = m.group(2)[:120]
        elif m := _OFFLOADED.search(line):
            self.gpu_layers = (int(m.group(1)), int(m.group(2)))
        elif (m := _REPACK.search(line)) and m.group(1) not in ("CPU_Mapped", "CPU"):
            self.repacked[m.group(1)] = float(m.group(2))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Runs between fork and exec: only async-signal-safe work. The libc
    # function was looked up before the fork.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent_pid[0]:
        os._exit(1)  # the node died before prctl took effect


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = libc.prctl
        return fn
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None


_prctl = _load_prctl()
_parent_pid = [os.getpid()]


class RunnerProcess:
    """One ``llama-server`` child process (see the module docstring).

    Args:
        binary: the llama-server executable.
        args: its arguments, without ``--host``, ``--port`` and the API key.
        name: the model's name, for log lines.
    """

    def __init__(self, binary: Path, args: Sequence[str], *, name: str) -> None:
        self.binary = binary
        self.args = list(args)
        self.name = name
        self.api_key = secrets.token_urlsafe(32)
        self.facts = RunnerFacts()
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self.returncode: int | None = None
        self.exited = trio.Event()
        self._url_known = trio.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._log = logging.getLogger(f"{__name__}.{name}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str | None:
        return self.facts.url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the process, then follow its output and its exit; returns
        once it has exited (``returncode`` set, ``exited`` fired).
        Cancelling it stops the process (SIGTERM, then SIGKILL after 3 s)."""
        argv = [str(self.binary), "--host", "127.0.0.1", "--port", "0", *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
        env["LLAMA_API_KEY"] = self.api_key
        _parent_pid[0] = os.getpid()
        # Popen from this (trio's) thread on purpose: PR_SET_PDEATHSIG fires
        # when the thread that forked the child ends, and trio's own
        # open_process forks from a worker thread that may end any time.
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - see above: fork from this thread
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, process_group=0, close_fds=True, preexec_fn=_die_with_parent,
        )
        assert self._proc.stdout is not None
        out = trio.lowlevel.FdStream(os.dup(self._proc.stdout.fileno()))
        self._proc.stdout.close()
        self._log.debug("started %s (pid %d)", " ".join(argv), self._proc.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_output, out)
                task_status.started()
                await self._wait_exit()
                nursery.cancel_scope.deadline = trio.current_time() + 1.0  # drain the pipe
        finally:
            with trio.CancelScope(shield=True):
                await self._stop()
                await out.aclose()

    async def _wait_exit(self) -> None:
        assert self._proc is not None
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except (AttributeError, OSError):  # pragma: no cover - old kernel or not Linux
            self._pidfd = None
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
        else:  # pragma: no cover
            while self._proc.poll() is None:  # noqa: ASYNC110 - no pidfd to wait on
                await trio.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        assert self._proc is not None
        rc = self._proc.wait()
        if self.returncode is None:
            self.returncode = rc
            self.exited.set()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _stop(self) -> None:
        proc = self._proc
        if proc is None or self.returncode is not None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(3.0):
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:  # pragma: no cover - no pidfd
                    while proc.poll() is None:  # noqa: ASYNC110
                        await trio.sleep(0.02)
            if proc.poll() is None:
                self._log.warning("runner pid %d ignored SIGTERM for 3 s: killing it", proc.pid)
                proc.kill()
        self._reap()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the runner (tests simulate crashes this way)."""
        if self._proc is not None and self.returncode is None:
            self._proc.send_signal(signum)

    async def _read_output(self, out: trio.lowlevel.FdStream) -> None:
        buf = b""
        while True:
            data = await out.receive_some(65536)
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._line(raw.decode("utf-8", errors="replace").rstrip())
            if len(buf) > 65536:  # a line that never ends: log it in pieces
                self._line(buf.decode("utf-8", errors="replace"))
                buf = b""
        if buf:
            self._line(buf.decode("utf-8", errors="replace").rstrip())

    def _line(self, line: str) -> None:
        if not line:
            return
        self.tail.append(line)
        if not self._url_known.is_set():
            # What runs is said while starting; every request adds lines too
            # (about 25 at this verbosity), which need no parsing.
            self.facts.feed(line)
            if self.facts.url is not None:
                self._url_known.set()
        # llama.cpp's lines read "0.01.511.213 I slot ...": E is an error;
        # a line without that prefix is a crash report or an assertion.
        head = line[:24].split(" ", 2)
        level = head[1] if len(head) > 2 and head[0][:1].isdigit() else ""
        alarming = level == "E" or (level not in ("I", "W", "D") and _ALARMING.search(line))
        self._log.log(logging.WARNING if alarming else logging.DEBUG, "%s", line)

    def last_lines(self, n: int = 8) -> str:
        """The runner's last ``n`` lines, joined (for error messages)."""
        return " | ".join(list(self.tail)[-n:])

    async def wait_healthy(self, client: httpx2.AsyncClient, limit: float) -> None:
        """Wait until the runner listens and ``/health`` answers 200.

        Raises:
            RunnerFailed: it exited first, or ``limit`` seconds passed.
        """
        with trio.move_on_after(limit):
            async with trio.open_nursery() as nursery:
                async def exited() -> None:
                    await self.exited.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(exited)
                await self._url_known.wait()
                while True:
                    try:
                        r = await client.get(f"{self.url}/health", timeout=2.0)
                        if r.status_code == 200:
                            nursery.cancel_scope.cancel()
                            return
                    except httpx2.HTTPError:
                        pass
                    await trio.sleep(0.05)
        if self.returncode is not None:
            raise RunnerFailed(f"the runner exited ({describe_exit(self.returncode)}) before "
                               f"it was ready: {self.last_lines()}", self.returncode)
        raise RunnerFailed(f"the runner was not ready within {limit:.0f} s: "
                           f"{self.last_lines()}")
