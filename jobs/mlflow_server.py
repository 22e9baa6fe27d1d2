"""Run the MLflow tracking server for volvlp_ray runs: UI, REST API, and artifacts proxied to a store.

    python jobs/mlflow_server.py                        # http://127.0.0.1:5000, {workspace}/mlflow.db, {workspace}/mlartifacts
    python jobs/mlflow_server.py --print-command        # show the `mlflow server` command, do not run it
    MLFLOW_BACKEND_STORE_URI=postgresql://user:pass@db:5432/mlflow \\
        python jobs/mlflow_server.py --host 0.0.0.0 --artifacts-destination s3://bucket/mlflow \\
        --allowed-hosts mlflow.internal,mlflow.internal:5000

Binds to loopback unless ``--host`` says otherwise. Jobs log to it with ``MLFLOW_TRACKING_URI=http://HOST:PORT``;
artifacts go through the server (``--serve-artifacts``), so jobs need no object-store credentials.
Credentials are read from the environment only: ``MLFLOW_BACKEND_STORE_URI`` (a database URI with a password)
is left in the environment, never put on the command line; S3 keys come from the instance role or ``AWS_*``.
Any option this script does not know (``--workers``, ``--allowed-hosts``, ``--app-name basic-auth``, ...)
goes to ``mlflow server`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def redact(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``."""
    return re.sub(r"(://[^/:@\s]+):[^@\s]+@", r"\1:***@", text)


def build_command(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """The ``mlflow server`` argv for these arguments and this environment."""
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workspace", default="workspace", help="home of the default SQLite file and artifacts")
    parser.add_argument("--backend-store-uri", default=None,
                        help="default: $MLFLOW_BACKEND_STORE_URI, else sqlite:///{workspace}/mlflow.db")
    parser.add_argument("--artifacts-destination", default=None,
                        help="default: $MLFLOW_ARTIFACTS_DESTINATION, else {workspace}/mlartifacts")
    parser.add_argument("--print-command", action="store_true")
    args, passthrough = parser.parse_known_args(argv)
    ws = Path(os.path.abspath(os.path.expanduser(args.workspace)))
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port), "--serve-artifacts"]
    if args.backend_store_uri:
        cmd += ["--backend-store-uri", args.backend_store_uri]
    elif not environ.get("MLFLOW_BACKEND_STORE_URI"):  # else `mlflow server` reads it from the environment
        cmd += ["--backend-store-uri", f"sqlite:///{ws / 'mlflow.db'}"]
    if args.artifacts_destination:
        cmd += ["--artifacts-destination", args.artifacts_destination]
    elif not environ.get("MLFLOW_ARTIFACTS_DESTINATION"):
        cmd += ["--artifacts-destination", (ws / "mlartifacts").as_uri()]
    return cmd + passthrough


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = build_command(argv)
    host = cmd[cmd.index("--host") + 1]
    if host not in LOOPBACK:
        print(f"[mlflow] binding {host}: reachable from the network; MLflow then accepts Host headers of localhost "
              "and private IPs only unless --allowed-hosts says otherwise; put it behind auth (--app-name basic-auth "
              "or a proxy)", file=sys.stderr)
    if "--print-command" in argv:
        print(redact(" ".join(cmd)))
        return 0
    if "--backend-store-uri" in cmd:
        uri = cmd[cmd.index("--backend-store-uri") + 1]
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    print(f"[mlflow] {redact(' '.join(cmd))}", flush=True)
    os.execv(cmd[0], cmd)  # the server takes this process's place (and pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
