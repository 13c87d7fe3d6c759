"""A real Ray head for tests, started with `ray start --head --block` in its own process group, on free loopback
ports, its own temp dir and (optionally) token authentication.

Shared machine rules: nothing here runs `ray stop` (it would kill every Ray on the machine, other sessions' too).
Every process of the cluster carries a unique tag in its environment (inherited by the raylet's workers, job
drivers and fake autoscaler nodes); `stop()` ends the head's `ray start` and then exactly the processes carrying
that tag, by pid. The test process's own environment is never changed (no RAY_ADDRESS, no auth settings leak into
the session-wide Ray of the other tests): clients run as subprocesses with `env()`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from helpers import REPO

BIN = Path(sys.executable).parent  # the venv the tests run in: `ray` and the job's `python` come from here
TAG_VAR = "RAYGPT_TEST_CLUSTER"


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now (held together while choosing, so no duplicates)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(size: int, avoid: set[int]) -> tuple[int, int]:
    """A run of `size` consecutive free ports (for --min/--max-worker-port), outside the ephemeral range."""
    for _ in range(100):
        start = random.randrange(20000, 30000 - size)
        ports = range(start, start + size)
        if avoid.intersection(ports):
            continue
        if all(_port_free(port) for port in ports):
            return start, start + size - 1
    raise RuntimeError(f"no {size} consecutive free ports found")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries this cluster's tag."""
    marker = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LocalHead:
    """`ray start --head` on this machine, reachable at 127.0.0.1 only; use as a context manager."""

    def __init__(
        self,
        num_cpus: int,
        auth: bool = True,
        autoscaling_config: Path | None = None,
        object_store_mb: int = 256,
        extra_env: dict[str, str] | None = None,  # for the head (and so its processes) only
    ) -> None:
        self.num_cpus = num_cpus
        self.auth = auth
        self.autoscaling_config = autoscaling_config
        self.object_store_mb = object_store_mb
        self.extra_env = dict(extra_env or {})
        self.tag = uuid.uuid4().hex
        # Short: Ray's Unix sockets live under it (108-byte path limit).
        self.root = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))
        self.token_path = self.root / "auth_token"
        self.token = secrets.token_hex(32)
        self.log_path = self.root / "ray-start.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports = free_ports(9)
        (
            self.gcs_port,
            self.dashboard_port,
            self.client_port,
            self.node_manager_port,
            self.object_manager_port,
            self.agent_http_port,
            self.agent_grpc_port,
            self.runtime_env_agent_port,
            self.metrics_port,
        ) = self.ports

    # ----------------------------------------------------------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, with_token: bool = True) -> dict[str, str]:
        """The environment of the head and of clients: venv first on PATH, no inherited Ray address or auth,
        loopback node IPs, and (with_token) token authentication with this head's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # get_node_ip_address() -> 127.0.0.1 for every process of the cluster (fake autoscaler nodes included),
        # instead of the machine's routable address.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env[TAG_VAR] = self.tag
        if self.auth and with_token:
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        elif self.auth:
            env["RAY_AUTH_MODE"] = "disabled"  # a client that sends no token
        return env

    def start(self, timeout_s: float = 240.0) -> LocalHead:
        if self.auth:
            self.token_path.write_text(self.token)
            self.token_path.chmod(0o600)
        used = set(self.ports)
        min_worker, max_worker = free_port_range(200, used)
        command = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--runtime-env-agent-port={self.runtime_env_agent_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--min-worker-port={min_worker}",
            f"--max-worker-port={max_worker}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.root / 'ray'}",
            "--disable-usage-stats",
        ]
        env = self.env()
        # For Ray's own processes that look the cluster up without an address (Ray Train's placement-group
        # cleaner uses the state API): with several Rays on this machine they would otherwise refuse to choose.
        env["RAY_ADDRESS"] = self.gcs_address
        env.update(self.extra_env)
        if self.autoscaling_config is not None:
            command.append(f"--autoscaling-config={self.autoscaling_config}")
            env["RAY_FAKE_CLUSTER"] = "1"
            env["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log()}")
            status = self.http_status("/api/version")
            if status == 200:
                return
            time.sleep(1.0)
        raise TimeoutError(f"the Ray head did not come up in {timeout_s:.0f} s:\n{self.log()}")

    def http_status(self, path: str, token: bool = True) -> int | None:
        """Status of a GET on the dashboard (None: not listening yet)."""
        headers = {"Authorization": f"Bearer {self.token}"} if token and self.auth else {}
        request = urllib.request.Request(self.dashboard_url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def get_json(self, path: str, timeout_s: float = 10) -> Any:
        """The JSON body of a GET on the dashboard (token attached): Serve's and the state API's REST routes."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.auth else {}
        request = urllib.request.Request(self.dashboard_url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def ray(self, *args: str, timeout_s: float = 120, with_token: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `ray` CLI as a client of this head (from the repository root)."""
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.env(with_token),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def python(self, code: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """Run Python code as a driver connected to this head (RAY_ADDRESS set for the child only)."""
        env = self.env()
        env["RAY_ADDRESS"] = self.gcs_address
        env.update(self.extra_env)
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )

    def add_node(self, num_cpus: int, hidden: list[Path]) -> subprocess.Popen[bytes]:
        """Start a worker node (``ray start --address``) that cannot see the folders ``hidden``: it runs in its own
        mount namespace, where an empty tmpfs is mounted over each of them (the rest of the filesystem, this
        checkout and its venv included, stays shared, like software installed on every node)."""
        ports = free_ports(6)
        min_worker, max_worker = free_port_range(200, set(self.ports) | set(ports))
        command = [
            sys.executable,
            str(REPO / "tests" / "helpers" / "ray_node.py"),
            "start",
            f"--address={self.gcs_address}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            f"--metrics-export-port={ports[5]}",
            f"--min-worker-port={min_worker}",
            f"--max-worker-port={max_worker}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
        ]
        mounts = " && ".join(f"mount -t tmpfs raygpt-hidden {shlex.quote(str(path))}" for path in hidden)
        script = f"{mounts} && exec {shlex.join(command)}"
        env = self.env()
        env["RAY_ADDRESS"] = self.gcs_address
        log = (self.root / f"node-{ports[0]}.log").open("wb")
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> list[int]:
        """End the head and every process tagged with this cluster; returns the pids that needed a kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # ray start --block shuts its node down on SIGTERM
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        leftovers = tagged_pids(self.tag)
        if leftovers:
            _signal_all(leftovers, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and tagged_pids(self.tag):
                time.sleep(0.5)
            _signal_all(tagged_pids(self.tag), signal.SIGKILL)
        if not os.environ.get("RAYGPT_KEEP_TEST_CLUSTER"):  # set it to keep the session logs for a post-mortem
            shutil.rmtree(self.root, ignore_errors=True)
        return leftovers

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def job_status(head: LocalHead, submission_id: str) -> dict[str, Any]:
    """A job's status through the REST API (token attached)."""
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {head.token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_job(head: LocalHead, submission_id: str, timeout_s: float, poll_s: float = 2.0) -> tuple[str, str]:
    """Poll a job until it ends or ``timeout_s`` passes; returns (last status, its logs)."""
    deadline = time.monotonic() + timeout_s
    status = "PENDING"
    while time.monotonic() < deadline:
        status = job_status(head, submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(poll_s)
    logs = head.ray("job", "logs", "--address", head.dashboard_url, submission_id)
    return status, logs.stdout + logs.stderr
