"""What a job shows on its console: a line per stage, progress bars, warnings and errors, a closing summary.

    from volvlp_ray import console
    console.info("[data] shards ready at …")
    console.warn("[data] skipped 2 corrupt samples")          # stderr, "warning:" unless the text says so
    with console.progress(total=n, desc="[prepare] train", unit="vol") as bar:
        bar.update(1, quarantined=q)
    console.summary("pre-training", [("run", name), ("checkpoint", path)])

Bars are ``tqdm`` bars on a terminal; when the output is a file or a pipe (a Ray job's log, CI), a bar prints a
plain line at each tenth of its total (``plain_lines`` per bar at most), so a job's output has a known length.

Ray's, DeepSpeed's, MLflow's and Hugging Face's own log records go to a log file (``setup_logging``), not the
console, unless ``--verbose`` (``VOLVLP_VERBOSE=1``). Ray workers' output is not forwarded to the driver then
(``ray.init(log_to_driver=False)``); what the project's code says in a worker (a training step, a warning)
reaches the driver's console through a small relay actor (:class:`Relay`) that the driver drains: rank 0's
step lines become the driver's training bar. A Train worker holds the relay's handle (``attach``) and sends
everything; any other worker (a Ray Data task, a sweep trial's worker) finds the relay by name and sends its
warnings and errors only. In a process without a relay (tests calling functions directly, a notebook),
``info``/``warn`` print where they are. Sweeps and ablations show a bar over their trials (``trial_progress``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Progress", "Relay", "attach", "attached", "error", "info", "is_verbose", "log_file", "progress",
           "ray_init_kwargs", "set_verbose", "setup_logging", "step", "summary", "trial_progress", "warn"]

log = logging.getLogger("volvlp_ray")
_SHOWN = {"volvlp_console": True}  # marks records whose text info/warn/error put on the console already
# the console's own lines, for the log file only: no other handler (a Ray worker's root handler, pytest's) prints
# them a second time
_lines = logging.getLogger("volvlp_ray.console.lines")
_lines.propagate = False
_lines.addHandler(logging.NullHandler())
_LEVELS = {"info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}

VERBOSE_ENV = "VOLVLP_VERBOSE"
#: libraries whose log records go to the log file only (the console, with --verbose)
QUIET_LOGGERS = ("ray", "deepspeed", "DeepSpeed", "mlflow", "transformers", "torch", "urllib3", "alembic",
                 "filelock", "fsspec", "huggingface_hub", "monai", "py.warnings", "matplotlib", "PIL")
RELAY_NAME = "volvlp_console_relay"

_board = None  # this process's relay handle (a Ray actor) when messages go to a driver
_lock = threading.Lock()
_log_path: str | None = None


def is_verbose() -> bool:
    """``--verbose`` (or ``VOLVLP_VERBOSE=1``): Ray's and the libraries' logs on the console too."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def set_verbose(flag: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if flag else "0"


def ray_init_kwargs(quiet: bool = True) -> dict[str, Any]:
    """``ray.init`` arguments for a job's driver: unless verbose (or not ``quiet``), the workers' output stays in
    Ray's log files and Ray's driver-side records go to the logging tree (this module's log file), not the console."""
    if quiet and not is_verbose():
        return {"log_to_driver": False, "configure_logging": False}
    return {"log_to_driver": True, "logging_level": logging.WARNING}


# ------------------------------------------------------------------------------------------------------
# lines


def _emit(kind: str, text: str) -> None:
    stream = sys.stderr if kind in ("warn", "error") else sys.stdout
    with _lock:
        if _active_bar is not None and _active_bar.tty:
            _active_bar.write(text, stream)
        else:
            print(text, file=stream, flush=True)


def _forward(kind: str, text: str) -> bool:
    """Send a line to the driver's relay when this process is a Ray worker with one; True when sent. A worker
    without a handle (a Ray Data task, a sweep trial's worker) looks the relay up by name for warnings and errors
    only: its progress lines stay in its own log."""
    board = _board
    if board is None and kind != "info":
        board = _lookup_relay()
    if board is None:
        return False
    try:
        board.post.remote(kind, text)
        return True
    except Exception:  # noqa: BLE001 - the relay is gone (driver ended): print here instead
        return False


def _lookup_relay():
    """In a Ray worker of a job whose driver runs a relay (a Ray Data task, a Train worker without a handle)."""
    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        return ray.get_actor(RELAY_NAME)
    except Exception:  # noqa: BLE001 - no relay: this job prints where it runs
        return None


def _say(kind: str, text: str) -> None:
    _lines.log(_LEVELS[kind], "%s", text, extra=_SHOWN)  # the log file (setup_logging's), never another handler
    if not _forward(kind, text):
        _emit(kind, text)


def info(text: str) -> None:
    """A progress or result line (stdout; from a Ray worker, the driver's stdout)."""
    _say("info", text)


def warn(text: str) -> None:
    """A warning (stderr; from a Ray worker, the driver's stderr). ``warning:`` is added unless present."""
    _say("warn", text if "warning" in text.lower() else f"warning: {text}")


def error(text: str) -> None:
    """An error line (stderr; from a Ray worker, the driver's stderr). ``error:`` is added unless present."""
    _say("error", text if "error" in text.lower() else f"error: {text}")


# ------------------------------------------------------------------------------------------------------
# progress bars

_active_bar: Progress | None = None


class Progress:
    """A bar of ``total`` units: a ``tqdm`` bar on a terminal, else a plain line at each tenth (and the end).

    ``update(n, **fields)`` advances it; ``set(done, **fields)`` sets the count; fields (loss, samples/s, …) are
    shown after the count. ``close()`` (or the ``with`` block's end) prints the final state once."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", plain_lines: int = 10,
                 stream=None, tty: bool | None = None, disabled: bool = False) -> None:
        self.total = int(total) if total else None
        self.desc, self.unit = desc, unit
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.t0 = time.time()
        self._marks = max(1, int(plain_lines))
        self._next_mark = 1
        self._closed = disabled
        self.disabled = disabled
        self._bar = None
        if self.tty and not disabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                             leave=True, mininterval=0.5)

    # -- tqdm-compatible bits
    def write(self, text: str, stream=None) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=stream or self.stream)

    def __enter__(self) -> Progress:
        global _active_bar
        if not self.disabled:
            _active_bar = self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fields_text(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return ", ".join(parts)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.set(self.done + n, **fields)

    def set(self, done: int, **fields: Any) -> None:
        step = done - self.done
        self.done = done
        self.fields.update(fields)
        if self.disabled:
            return
        if self._bar is not None:
            if fields:
                self._bar.set_postfix_str(self._fields_text(), refresh=False)
            self._bar.update(step)
            return
        if self.total:
            while self._next_mark <= self._marks and self.done * self._marks >= self._next_mark * self.total:
                self._next_mark += 1
                if self.done < self.total:  # the last mark is printed by close()
                    self._line()
                    break
            while self._next_mark <= self._marks and self.done * self._marks >= self._next_mark * self.total:
                self._next_mark += 1  # several marks passed at once: one line

    def _line(self, final: bool = False) -> None:
        el = time.time() - self.t0
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            pct = 100.0 * self.done / self.total
            head = f"{self.desc} {self.done}/{self.total}{unit} ({pct:.0f}%)"
            if not final and self.done:
                eta = el * (self.total - self.done) / self.done
                head += f", {_duration(el)} elapsed, ETA {_duration(eta)}"
            else:
                head += f" in {_duration(el)}"
        else:
            head = f"{self.desc} {self.done}{unit} in {_duration(el)}"
        f = self._fields_text()
        print(head + (f"; {f}" if f else ""), file=self.stream, flush=True)

    def close(self) -> None:
        global _active_bar
        if self._closed:
            return
        self._closed = True
        if _active_bar is self:
            _active_bar = None
        if self._bar is not None:
            if self.fields:
                self._bar.set_postfix_str(self._fields_text(), refresh=False)
            self._bar.close()
        else:
            self._line(final=True)


def progress(total: int | None = None, desc: str = "", unit: str = "it", plain_lines: int = 10,
             iterable: Iterable | None = None, **kwargs: Any) -> Progress:
    """A :class:`Progress` bar (use as a context manager)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return Progress(total, desc, unit=unit, plain_lines=plain_lines, **kwargs)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------------------------------
# summary


def summary(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """A two-column table: ``title`` then one ``name  value`` line per row (rows with value None are left out)."""
    rows = [(str(k), str(v)) for k, v in rows if v is not None]
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"── {title} " + "─" * max(3, 60 - len(title))]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    _emit("info", "\n".join(lines))


# ------------------------------------------------------------------------------------------------------
# library logs -> a file


def log_file() -> str | None:
    """The file this process's library logs go to (``setup_logging``), or None."""
    return _log_path


class _ConsoleFilter(logging.Filter):
    """Records for the console handler: not those info/warn/error printed already; unless verbose, only the
    project's own (``volvlp_ray.*``)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "volvlp_console", False):
            return False
        return self.verbose or record.name == "volvlp_ray" or record.name.startswith("volvlp_ray.")


def setup_logging(log_dir: str | os.PathLike | None, name: str, verbose: bool | None = None) -> str | None:
    """Send library log records to ``log_dir/name.log`` (created) and, unless verbose, keep them off the console.

    The project's own warnings (``volvlp_ray.*`` loggers, ``warnings.warn`` from its code) still reach the
    console. Returns the log file's path (None when ``log_dir`` is None: then only the levels change)."""
    global _log_path
    verbose = is_verbose() if verbose is None else verbose
    root = logging.getLogger()
    path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = str(Path(log_dir) / f"{name}.log")
        if _log_path != path:
            for h in list(root.handlers):
                if getattr(h, "_volvlp", False) and isinstance(h, logging.FileHandler):
                    root.removeHandler(h)
                    h.close()
            for h in list(_lines.handlers):
                if getattr(h, "_volvlp", False):
                    _lines.removeHandler(h)
            fh = logging.FileHandler(path)
            fh._volvlp = True  # type: ignore[attr-defined]
            fh.setLevel(logging.INFO)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(fh)
            _lines.addHandler(fh)
            _log_path = path
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if not any(getattr(h, "_volvlp_console", False) for h in root.handlers):
        ch = logging.StreamHandler(sys.stderr)
        ch._volvlp_console = True  # type: ignore[attr-defined]
        ch.setLevel(logging.WARNING)
        ch.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(ch)
    for h in root.handlers:
        if getattr(h, "_volvlp_console", False):
            for f in list(h.filters):
                h.removeFilter(f)
            h.addFilter(_ConsoleFilter(verbose))
    if not verbose:  # verbose: the libraries keep their own console handlers, as they set them up
        # these set up their own console handlers when imported: import them first (every job uses them anyway)
        for module in ("ray", "ray.data", "mlflow"):
            try:
                __import__(module)
            except ImportError:
                pass
        quiet = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in QUIET_LOGGERS]
        for name_ in sorted(set(quiet) | set(QUIET_LOGGERS)):
            lg = logging.getLogger(name_)
            own = [h for h in lg.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
            for h in own:
                h.setLevel(logging.CRITICAL + 1)
            if own:
                lg.propagate = True  # their records reach the log file through the root
    logging.captureWarnings(True)
    _install_showwarning(verbose)
    return path


def _install_showwarning(verbose: bool) -> None:
    root_dir = Path(__file__).resolve().parents[1]
    ours = (str(root_dir / "volvlp_ray") + os.sep, str(root_dir / "jobs") + os.sep)

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        shown = verbose or str(filename).startswith(ours)
        if shown:
            _emit("warn", text)
        logging.getLogger("py.warnings").warning("%s", text, extra=_SHOWN if shown else None)

    warnings.showwarning = show


# ------------------------------------------------------------------------------------------------------
# the relay: workers -> driver


class _RelayActor:
    """Holds lines posted by workers until the driver drains them (a Ray actor, no CPU reserved)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []

    def post(self, kind: str, payload: Any) -> None:
        self.items.append((kind, payload))

    def drain(self) -> list[tuple[str, Any]]:
        out, self.items = self.items, []
        return out


class Relay:
    """Driver side: start the relay actor, print what workers post, feed step updates to a training bar.

        with console.Relay() as relay:
            trainer_config["console"] = relay.handle   # the train loop calls console.attach(handle)
            result = trainer.fit()
    """

    def __init__(self, poll_s: float = 0.5) -> None:
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=0)(_RelayActor)
        try:
            old = ray.get_actor(RELAY_NAME)
            ray.kill(old)
        except ValueError:
            pass
        self.handle = actor.options(name=RELAY_NAME, lifetime=None).remote()
        self.poll_s = poll_s
        self.bar: Progress | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="volvlp-console-relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.drain()

    def drain(self) -> None:
        import ray

        try:
            items = ray.get(self.handle.drain.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the relay died with the cluster: nothing more to show
            return
        for kind, payload in items:
            if kind == "step":
                self._step(payload)
            else:
                _lines.log(_LEVELS.get(kind, logging.INFO), "%s", payload, extra=_SHOWN)  # the driver's log file
                _emit(kind, payload)

    def _step(self, p: dict) -> None:
        if self.bar is None:
            self.bar = Progress(p.get("total"), p.get("desc", "[train] step"), unit="")
            self.bar.__enter__()  # lines printed meanwhile go above a terminal bar
        fields = {k: v for k, v in p.items() if k not in ("step", "total", "desc")}
        self.bar.set(int(p["step"]), **fields)

    def close(self) -> None:
        import ray

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self.drain()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        try:
            ray.kill(self.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass


def attach(handle) -> None:
    """In a Ray worker: send ``info``/``warn``/``error`` and ``step`` to the driver's relay ``handle``."""
    global _board
    _board = handle


def attached() -> bool:
    """Whether this process sends its lines to a driver's relay."""
    return _board is not None


def step(step_: int, total: int, **fields: Any) -> bool:
    """Rank 0's training progress for the driver's training bar; False when there is no relay (then the caller
    prints its own line)."""
    if _board is None:
        return False
    try:
        _board.post.remote("step", {"step": int(step_), "total": int(total), **fields})
        return True
    except Exception:  # noqa: BLE001 - the driver is gone
        return False


class _ProjectHandler(logging.Handler):
    """On the ``volvlp_ray`` logger: the project's warnings and errors logged in a Ray worker (a Ray Data task
    reading a truncated shard, say) go to the driver's relay; elsewhere, when no handler of the process shows them
    (no ``setup_logging``), to stderr as Python's last resort would. Lines that ``info``/``warn``/``error`` printed
    already are skipped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "volvlp_console", False):
            return
        try:
            text = f"{record.levelname.lower()}: [{record.name}] {record.getMessage()}"
            if _forward("error" if record.levelno >= logging.ERROR else "warn", text):
                return
            if logging.getLogger().handlers:  # the root's handlers show it (setup_logging's, Ray's, pytest's)
                return
            sys.stderr.write(text + "\n")
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


if not any(isinstance(h, _ProjectHandler) for h in log.handlers):
    log.addHandler(_ProjectHandler())


def trial_progress(tag: str):
    """A Ray Tune callback (driver side): a bar over the experiment's trials -- finished / total, running, failed --
    instead of Tune's status table, and a warning per failed trial."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self) -> None:
            self.tag, self.total, self.bar, self.failed = tag, None, None, set()

        def __getstate__(self) -> dict:  # saved with the experiment (a resumed one gets a new bar)
            return {"tag": self.tag, "total": self.total, "bar": None, "failed": set()}

        def setup(self, total_num_samples=None, **info) -> None:
            self.total = total_num_samples

        def on_step_end(self, iteration, trials, **info) -> None:
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            if self.bar is None:
                self.bar = Progress(self.total or len(trials), f"[{self.tag}] trials", unit="done", plain_lines=10)
                self.bar.__enter__()
            self.bar.total = max(self.bar.total or 0, len(trials))
            running = sum(t.status == "RUNNING" for t in trials)
            if done != self.bar.done or running != self.bar.fields.get("running"):
                self.bar.set(done, running=running, failed=len(self.failed))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            if trial.trial_id not in self.failed:
                self.failed.add(trial.trial_id)
                warn(f"[{self.tag}] warning: trial {trial.trial_id} ({trial.config}) failed: "
                     f"{getattr(trial, 'error_file', None) or 'see the Ray Tune log'}")

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.set(sum(t.status in ("TERMINATED", "ERROR") for t in trials), running=0,
                             failed=len(self.failed))
                self.bar.close()
                self.bar = None

    return TrialProgress()

