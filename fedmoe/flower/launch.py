"""A recipe on Flower from one command (``fedmoe flower``): the Simulation Engine in this process,
or a local Deployment Engine (a SuperLink and one SuperNode per client on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fedmoe.errors import UsageError
from fedmoe.flower import APP_DIR
from fedmoe.flower.client import ClientSettings, make_client_app
from fedmoe.flower.server import Outcome, ServerSettings, make_server_app, read_outcome


def _quiet() -> None:
    """Flower's and Ray's own logging down to warnings (our progress is the metrics log)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


def simulate(
    server: ServerSettings,
    client: ClientSettings,
    num_clients: int,
    cpus: int | None = None,
    cpus_per_client: float = 1.0,
) -> Path:
    """Run ``server.recipe`` on Flower's Simulation Engine (Ray backend): one virtual SuperNode per
    client, ``cpus / cpus_per_client`` of them at a time. Returns the run folder; raises the
    server's error (a :class:`~fedmoe.errors.FedMoeError` keeps its exit code)."""
    from flwr.simulation import run_simulation

    _quiet()
    total = cpus or max(1, os.cpu_count() or 1)
    outcome = Outcome()
    run_simulation(
        server_app=make_server_app(server, outcome),
        client_app=make_client_app(client),
        num_supernodes=num_clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": total,
                "num_gpus": 0,
                "logging_level": "ERROR",
                "log_to_driver": False,
            },
        },
    )
    if outcome.error is not None:
        raise outcome.error
    if outcome.folder is None:
        raise RuntimeError("the Flower simulation ended without running the server app")
    return outcome.folder


_TAG = "FEDMOE_FLOWER_DEPLOYMENT"  # marks every process a local deployment starts


def _registered(log: Path) -> Callable[[], bool]:
    """Whether a SuperNode's log says it registered with the SuperLink."""
    return lambda: re.search(rb"SuperNode ID: \d+", log.read_bytes()) is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tagged(tag: str) -> list[int]:
    """Live processes (Linux: from /proc) whose environment carries ``tag``."""
    mark = f"{_TAG}={tag}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        if int(d.name) == os.getpid():
            continue
        try:
            if mark not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(d.name))
    return found


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, in insecure mode, each with its own
    Flower home, ports and log file under ``work``; stopped (and every process they started
    swept) on exit. For trying a deployment on one machine and for tests; across machines, start
    the same commands yourself with TLS (see the README's "Running on Flower")."""

    def __init__(self, work: Path, node_configs: list[str]) -> None:
        self.work = work
        self.node_configs = node_configs
        self.bin = Path(sys.executable).parent
        self.tag = uuid.uuid4().hex
        self.port = _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.env = dict(os.environ)
        self.env.update(
            {
                "PATH": f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}",
                "FLWR_DISABLE_UPDATE_CHECK": "1",  # no network
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1",
                _TAG: self.tag,
            }
        )

    def _home(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        home = self.work / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(home)
        return env

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self._home(name), cwd=self.work,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def _wait(self, what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 120
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; see {self.work}")
            time.sleep(0.2)

    def __enter__(self) -> LocalDeployment:
        try:
            link = self._start(
                "superlink",
                [str(self.bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                 "--port", str(self.port), "--disable-runtime-dependency-installation",
                 "--isolation", "subprocess"],
            )  # fmt: skip
            self._wait("the SuperLink", self._healthy, link)
            for i, node_config in enumerate(self.node_configs):
                node = self._start(
                    f"supernode-{i}",
                    [str(self.bin / "flower-supernode"), "--insecure",
                     "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                     "--port", str(_free_port()), "--isolation", "subprocess",
                     "--node-config", node_config],
                )  # fmt: skip
                self._wait(f"SuperNode {i}", _registered(self.work / f"supernode-{i}.log"), node)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """The ``flwr`` CLI against this deployment (as the connection ``local``)."""
        env = self._home("cli")
        (Path(env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        return subprocess.run(
            [str(self.bin / "flwr"), *args], env=env, cwd=self.work, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        for proc in reversed(self.procs):  # SuperNodes first
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # the runtimes Flower starts in a session of their own end when their parent does; sweep
        while _tagged(self.tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _tagged(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for log in self.logs:
            log.close()


def deploy(
    server: ServerSettings,
    client: ClientSettings,
    num_clients: int,
    console: Any = None,
    timeout_s: float = 3600.0,
) -> Path:
    """Run ``server.recipe`` on a local Deployment Engine: a SuperLink and one SuperNode per
    client on 127.0.0.1 (insecure mode), the run submitted with ``flwr run`` as a user would.
    Returns the run folder; raises the ServerApp's error (same class, same exit code)."""
    import shlex

    _quiet()
    work = Path(tempfile.mkdtemp(prefix="fedmoe-flower-"))  # logs; kept when the run fails
    with contextlib.ExitStack() as cleanup:
        outcome = work / "outcome.json"
        nodes = [
            f"partition-id={i} num-partitions={num_clients} "
            f"exchange={_toml(client.exchange)} client-dir={_toml(client.client_dir)}"
            for i in range(num_clients)
        ]
        with LocalDeployment(work, nodes) as dep:
            if console is not None:
                console.print(f"SuperLink and {num_clients} SuperNodes up on 127.0.0.1:{dep.port}")
            config = (
                f"recipe={_toml(server.recipe)} out={_toml(server.out)} "
                f"overrides={_toml('; '.join(server.overrides))} "
                f"force={'true' if server.force else 'false'} outcome={_toml(str(outcome))}"
            )
            try:
                done = dep.flwr(
                    "run", str(APP_DIR), "local", "--run-config", config, "--stream",
                    timeout=timeout_s,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"the Flower run did not end within {timeout_s:.0f} s; logs in {work}"
                ) from None
            if "Successfully started run" not in done.stdout + done.stderr:
                tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
                raise UsageError(
                    "flwr run did not start the run: " + " / ".join(tail),
                    hint=f"check Flower's install ({shlex.quote(str(dep.bin / 'flwr'))})",
                )
            folder = read_outcome(outcome)
            cleanup.callback(shutil.rmtree, work, True)
            return folder
    raise AssertionError("unreachable")


def _toml(text: str) -> str:
    """A TOML string literal, for Flower's ``key=value`` configs."""
    return json.dumps(text)
