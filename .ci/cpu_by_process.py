#!/usr/bin/env python3
"""Where a command's CPU goes, process by process: run COMMAND, sample every process on the machine from ``/proc``
every ``--every`` seconds while it runs, and attribute each process's CPU time (user + system) to what the process
is -- a Ray actor or task by the title Ray gives it (``ray::RayTrainWorker``, ``ray::TrainController`` ...), a Ray
service, the pytest process, an MLflow server, pip ... Linux only, standard library only.

    python3 .ci/cpu_by_process.py --json cpu.json -- bash .ci/run

prints a table by group (``GROUPS``) and writes every title's CPU-seconds and process count to ``--json``. The
README's "The test suite's time" was measured this way. CPU a process spent between two samples is counted under
the title it has at the second; a process that starts and ends between two samples is missed (the total printed
next to the machine's busy CPU-seconds, from ``/proc/stat``, shows how much that is). Processes that were running
before COMMAND started count from then on only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")

# (group, test on the title): the first match wins
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("Ray Train training workers", ("ray::RayTrainWorker", "ray::execute._set_torch", "ray::execute._setup_torch")),
    ("Tune trial processes", ("ray::ImplicitFunc",)),
    ("Ray Train / Ray Data control actors", (
        "ray::TrainController", "ray::PlacementGroupCleaner", "ray::SynchronizationActor", "ray::DatasetManager",
        "ray::SplitCoordinator", "ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::ActorLocationTracker",
        "ray::_QueueActor", "ray::JobSupervisor")),
    ("Ray worker processes starting or idle", ("ray worker: starting", "ray::IDLE")),
    ("Ray services", ("ray service", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray-dashboard")),
    ("Ray Data tasks", ("ray::ReadShard", "ray::Map", "ray::FlatMap", "ray::MapWorker", "ray::MapBatches")),
    ("console relay actor", ("ray::_RelayActor",)),
    ("pytest and the job processes it starts", ("pytest", "job: ")),
    ("MLflow servers", ("mlflow server",)),
    ("install (pip)", ("pip",)),
]


def title(cmdline: str, comm: str) -> str:
    """What a process is, from its command line (Ray rewrites a worker's to ``ray::Class.method``)."""
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    if "default_worker.py" in cmdline:
        return "ray worker: starting"
    if any(s in cmdline for s in ("gcs_server", "raylet", "log_monitor.py", "autoscaler", "dashboard", "runtime_env")):
        return "ray service"
    if "pytest" in cmdline:  # the test process, and job processes whose arguments name pytest's tmp folders
        return "pytest"
    if "jobs/" in cmdline:
        return "job: " + cmdline.split("jobs/")[1].split()[0]
    if any(s in cmdline for s in ("mlflow", "gunicorn", "uvicorn")):
        return "mlflow server"
    words = cmdline.split()
    if any(os.path.basename(w) in ("pip", "pip3") for w in words[:2]) or words[1:3] == ["-m", "pip"]:
        return "pip"
    return comm or "?"


def group_of(name: str) -> str:
    for group, prefixes in GROUPS:
        if any(name.startswith(p) for p in prefixes):
            return group
    return "other"


def busy_cpu_seconds() -> float:
    """The machine's busy CPU time (user, nice, system, irq, softirq) from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / HZ


class Sampler(threading.Thread):
    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.last: dict[str, float] = {}
        self.cpu: collections.Counter[str] = collections.Counter()
        self.pids: dict[str, set[str]] = collections.defaultdict(set)
        self.done = threading.Event()
        self.sample(count=False)  # what runs already counts from now

    def sample(self, count: bool = True) -> None:
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/cmdline") as f:
                    cmdline = f.read().replace("\0", " ").strip()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / HZ
            if count:
                name = title(cmdline, stat[stat.find("(") + 1:stat.rfind(")")])
                spent = cpu - self.last.get(pid, 0.0)
                if spent > 0:
                    self.cpu[name] += spent
                    self.pids[name].add(pid)
            self.last[pid] = cpu

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples (default 0.5)")
    parser.add_argument("--json", help="write every title's CPU-seconds and process count here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if not os.path.isdir("/proc/self"):
        parser.error("needs Linux's /proc")
    sampler = Sampler(args.every)
    busy0, t0 = busy_cpu_seconds(), time.time()
    sampler.start()
    rc = subprocess.call(command)
    sampler.done.set()
    sampler.join()
    sampler.sample()
    wall, busy = time.time() - t0, busy_cpu_seconds() - busy0
    groups: collections.Counter[str] = collections.Counter()
    processes: collections.Counter[str] = collections.Counter()
    for name, seconds in sampler.cpu.items():
        groups[group_of(name)] += seconds
        processes[group_of(name)] += len(sampler.pids[name])
    total = sum(groups.values())
    print(f"\n{' '.join(command)}: exit {rc}, {wall:.0f} s, {busy:.0f} busy CPU-seconds on the machine "
          f"({busy / wall / (os.cpu_count() or 1):.0%} of {os.cpu_count()} CPUs), {total:.0f} attributed:",
          file=sys.stderr)
    for group, seconds in groups.most_common():
        print(f"  {seconds:8.1f}  {processes[group]:5d} processes  {group}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "exit": rc, "wall_s": wall, "busy_cpu_s": busy, "attributed_cpu_s": total,
                       "groups": dict(groups.most_common()),
                       "titles": {k: [round(v, 2), len(sampler.pids[k])] for k, v in sampler.cpu.most_common()}},
                      f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
