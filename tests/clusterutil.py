"""Real local services for the cluster tests: a Ray head (`ray start --head`) and an MLflow tracking server.

Both run as their own process groups and are stopped (SIGTERM, then SIGKILL) by :func:`stop`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    # a job's `python` (the entrypoint runs on the head with the head's PATH) is this interpreter, venv or not
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    return env


def ray_env(token: str) -> dict[str, str]:
    """Environment of a token-authenticated Ray head and its clients (the token is this cluster's own, not
    ~/.ray/auth_token, which other Ray instances on the machine share)."""
    return {**base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def new_token() -> str:
    return secrets.token_hex(32)


def start_ray_head(log: Path, env: dict[str, str], num_cpus: int = 4) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports; returns the process and the dashboard (job API) address."""
    port, dash = free_port(), free_port()
    # every agent port explicit: another Ray instance on this machine (the suite's own, a user's) holds defaults
    # such as the dashboard agent's 52365, and a head whose agent cannot bind accepts no jobs
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=true", *agent_ports],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{dash}"


def wait_ray_head(proc: subprocess.Popen, address: str, env: dict[str, str], log: Path, timeout: float = 180) -> None:
    """Until the head's job server answers an authenticated `ray job list`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return
        if proc.poll() is not None:
            raise RuntimeError("the Ray head exited:\n" + log.read_text()[-3000:])
        time.sleep(2)
    raise TimeoutError("the Ray head's job server did not come up:\n" + log.read_text()[-3000:])


def start_mlflow_server(root: Path, port: int, *args: str) -> subprocess.Popen:
    """`python jobs/mlflow_server.py` (the project's launcher): SQLite in ``root``, artifacts in
    ``root/mlartifacts``, one worker; no ``--host`` unless ``args`` has one."""
    cmd = [sys.executable, str(ROOT / "jobs" / "mlflow_server.py"), "--port", str(port), "--workspace", str(root),
           "--workers", "1", *args]
    return subprocess.Popen(cmd, env=base_env(), stdout=open(root / "mlflow-server.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=root)


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def wait_http_ok(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if http_status(url) == 200:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited:\n" + log.read_text()[-3000:])
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 in {timeout:.0f}s:\n" + log.read_text()[-3000:])


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local IPs on which the process ``pid`` or any of its descendants listens on TCP ``port``."""
    import psutil

    root = psutil.Process(pid)
    out: set[str] = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return out


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine outside 127.0.0.0/8, if it has one."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def stop(*procs: subprocess.Popen | None, timeout: float = 60) -> None:
    """SIGTERM to each process group (all at once), SIGKILL to those still there after ``timeout`` seconds."""
    procs = tuple(p for p in procs if p is not None)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.5)
    for proc in procs:
        if _alive(proc):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None or _group_alive(proc.pid)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and every descendant (a job's driver with the local Ray it started)."""
    import psutil

    for p in [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
