"""Non-finite loss or gradients: skip the step, count it, and roll back when it keeps happening.

**Detection, with no extra collective.** Every rank multiplies its loss by 1 when it is finite and by NaN when it
is not (on the device, no read-back), so a non-finite loss on any rank becomes non-finite gradients; the
gradients are then averaged across ranks by the step's own reduction, so every rank holds a non-finite gradient
norm. DeepSpeed computes that global norm anyway (for clipping) and, when it is not finite, skips the update:

- ZeRO-1/2 (``stage_1_and_2.py`` ``step``) and ZeRO-3 (``stage3.py`` ``step``) in fp32 and bf16: the global norm
  (an all-reduce they already do) is checked with ``is_invalid_grad_norm``; on a non-finite one the optimizer sets
  ``overflow``, zeroes the gradients and returns without updating.
- ZeRO-0 in bf16: DeepSpeed's ``BF16_Optimizer`` does the same.
- ZeRO-0 in fp32 (CPU): DeepSpeed steps the plain torch optimizer after ``clip_grad_norm_``, whose global norm
  it all-reduces and then discards: a NaN norm turns every gradient into NaN and the update would write NaN into
  the weights. :func:`skip_non_finite_plain_steps` keeps that norm and, through a ``register_step_pre_hook`` of the
  optimizer, drops the gradients (the step is a no-op) and sets ``optimizer.overflow`` -- the attribute DeepSpeed's
  engine reads after ``optimizer.step()`` (``_take_model_step``). With ``gradient_clipping`` 0 there is no such norm;
  the hook then takes the local norm of the already all-reduced (so identical) gradients: no collective either.

With ``overflow`` set the engine counts the step in ``engine.skipped_steps`` (saved in its checkpoints), does not
advance the LR schedule, and ``engine.was_step_applied()`` is False on every rank alike (a host bool DeepSpeed has
already synchronised). Under grad-cache (``train.grad_cache_micro_batch``) the same holds: the loss is poisoned
before the feature gradients are taken, and the check runs at the accumulation boundary.

**Rollback.** :class:`BadSteps` counts consecutive skipped steps. After ``train.max_bad_steps`` of them every rank
raises :class:`RollbackError` at the same step (they all see the same flag); Ray Train restarts the worker group
from the latest checkpoint (step 0 when there is none yet). Before that, rank 0 appends the bad steps to
``{run folder}/bad_steps.json`` (local path or any pyarrow URI); the restarted run reads it, and on the replay the
batches of the recorded steps are consumed but not trained on. When a run of bad steps comes after
``train.max_rollbacks`` rollbacks, every rank raises :class:`NonFiniteTrainingError` instead, and
:class:`FailureBudget` (a Ray Train callback in the controller) turns it into a controller error, which Ray Train
2.60 does not retry (it retries every worker error up to ``max_failures``, controller errors not). A
later start of the same run that finds more recorded runs of bad steps than ``train.max_rollbacks`` stops at once
with the same error (raise the setting to continue from the latest checkpoint, skipping the recorded steps).

**Test-only hook** ``VOLVLP_INJECT_NAN``: comma-separated ``step`` (every rank) or ``rank:step`` items; the
loss of that rank at that global step (1-based, as in the ``[train] step N`` lines) is multiplied by NaN. It is
stateless and fires on every attempt that trains that step: a step recorded as bad is not trained on the replay
after a rollback (so it does not fire there), an injected step that was not recorded fires again.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ray.train import UserCallback

from volvlp_ray import console
from volvlp_ray.config import Config

__all__ = [
    "INJECT_ENV", "RECORD_FILE", "BadSteps", "FailureBudget", "NanInjection", "NonFiniteTrainingError",
    "RollbackError", "finite_or_nan", "skip_non_finite_plain_steps",
]

INJECT_ENV = "VOLVLP_INJECT_NAN"
RECORD_FILE = "bad_steps.json"


class RollbackError(RuntimeError):
    """Raised by every rank at the same step: Ray Train restarts the worker group from the latest checkpoint."""


class NonFiniteTrainingError(RuntimeError):
    """Raised by every rank when the rollbacks are used up; not retried (see :class:`FailureBudget`)."""


class FailureBudget(UserCallback):
    """Ray Train callback (it runs in the controller) that keeps rollbacks and worker failures apart.

    Ray Train 2.60 retries every worker error up to ``FailureConfig.max_failures`` and no controller error.
    ``build_trainer`` sets that limit to ``train.max_failures + train.max_rollbacks``; this callback then sees
    each worker error first and: lets a :class:`RollbackError` be retried (their number is bounded by
    ``train.max_rollbacks`` through the record); raises a :class:`NonFiniteTrainingError` again in the controller,
    so the run ends with its message and is not retried; and raises any other worker error once more than
    ``max_failures`` of them happened (-1: never), so that rollbacks' retries do not serve ordinary failures.
    A worker lost to a node preemption is not counted (Ray Train retries those on a budget of their own)."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        texts = {rank: f"{type(e).__name__}: {e}" for rank, e in sorted(worker_exceptions.items())}
        for text in texts.values():
            if NonFiniteTrainingError.__name__ in text:
                cut = text.find(_MESSAGE_START)
                raise NonFiniteTrainingError(text[cut:] if cut >= 0 else text)
        if any(RollbackError.__name__ in t for t in texts.values()) or any(map(_preempted,
                                                                                worker_exceptions.values())):
            return
        self.failures += 1
        if 0 <= self.max_failures < self.failures:
            first = next(iter(texts.items()))
            raise RuntimeError(f"worker failure {self.failures} with train.max_failures={self.max_failures}: the run "
                               f"stops. Rank {first[0]}: {first[1]}")


_MESSAGE_START = "non-finite loss/gradients in"


def _preempted(error: Exception) -> bool:
    """A worker death caused by a node preemption (a ``RayActorError`` with ``preempted`` set, possibly inside
    Ray Train's health-check error): what Ray Train's failure policy counts as a preemption."""
    error = getattr(error, "health_check_failure", error)
    return bool(getattr(error, "preempted", False))


class NanInjection:
    """``VOLVLP_INJECT_NAN`` (test-only, see the module docstring): the global steps at which this rank's loss is
    multiplied by NaN."""

    def __init__(self, spec: str | None, rank: int):
        self.steps: set[int] = set()
        for item in (spec or "").replace(" ", "").split(","):
            if not item:
                continue
            try:
                who, _, when = item.rpartition(":")
                if who == "" or int(who) == rank:
                    self.steps.add(int(when))
            except ValueError:
                raise ValueError(f"{INJECT_ENV}={spec!r}: expected comma-separated 'step' or 'rank:step' items, "
                                 f"got {item!r}") from None

    @classmethod
    def from_env(cls, rank: int) -> NanInjection:
        return cls(os.environ.get(INJECT_ENV), rank)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def fires(self, step: int) -> bool:
        return step in self.steps


def finite_or_nan(loss: torch.Tensor, inject: bool = False) -> torch.Tensor:
    """``loss`` times 1 when it is finite, times NaN when not (and times NaN when ``inject``): a non-finite loss
    always gives non-finite gradients, which the optimizer's global gradient norm then reveals on every rank.
    On the device, no read-back; a finite loss and its gradients are unchanged bit for bit."""
    if inject:
        loss = loss * float("nan")
    d = loss.detach()
    return loss * torch.where(torch.isfinite(d), 1.0, float("nan")).to(d.dtype)


def skip_non_finite_plain_steps(engine) -> bool:
    """Make an engine whose optimizer DeepSpeed does not wrap (ZeRO-0 in fp32) skip a step with a non-finite
    global gradient norm like its ZeRO/bf16 optimizers do (see the module docstring). Returns whether it was
    needed (False: DeepSpeed's optimizer already has ``overflow`` and skips by itself)."""
    optimizer = engine.optimizer
    if optimizer is None or hasattr(optimizer, "overflow"):
        return False
    kept: dict[str, torch.Tensor] = {}
    if engine.gradient_clipping() > 0:
        from deepspeed.runtime.utils import clip_grad_norm_

        def clip_fp32_gradients() -> None:  # DeepSpeed's engine.clip_fp32_gradients, keeping the norm it returns
            kept["norm"] = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                           mpu=engine.mpu)

        engine.clip_fp32_gradients = clip_fp32_gradients

    def before_step(opt, args, kwargs) -> None:
        norm = kept.pop("norm", None)
        if norm is None:  # no clipping: the local norm of the gradients, already all-reduced by the engine
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros(())
        opt.overflow = not bool(torch.isfinite(norm).all())
        if opt.overflow:
            opt.zero_grad(set_to_none=True)  # no gradient, no update: AdamW/Muon skip such parameters

    optimizer.overflow = False
    optimizer.register_step_pre_hook(before_step)
    return True


class BadSteps:
    """Per rank: which steps to leave out on a replay, the count of consecutive skipped steps, and the rollback
    (or the final stop) when they reach ``train.max_bad_steps``. Every rank takes the same decisions from the
    same inputs (the record, the synchronised skip flag)."""

    def __init__(self, cfg: Config, rank: int, run_dir: str | None, start_step: int):
        self.max_bad, self.max_rollbacks = cfg.train.max_bad_steps, cfg.train.max_rollbacks
        self.rank = rank
        self.path = None
        self.record: dict[str, Any] = {"rollbacks": []}
        if run_dir:
            from volvlp_ray.data import storage

            self.path = storage.child(run_dir, RECORD_FILE)
            if storage.exists(self.path):
                self.record = storage.read_json(self.path)
        self.replay: set[int] = {s for r in self.record["rollbacks"] for s in r["bad_steps"]}
        self.checkpoint_step = start_step  # the latest checkpoint this attempt knows of (0: none)
        self.streak: list[int] = []
        n = len(self.record["rollbacks"])
        if n > self.max_rollbacks:  # a restart (or a new driver) of a run that was stopped: stop again
            raise NonFiniteTrainingError(self._stop_message(self.record["rollbacks"][-1]["bad_steps"], n - 1,
                                                            again=True))
        if n and rank == 0:
            console.info(f"[train] replaying after {n} rollback(s) (train.max_rollbacks={self.max_rollbacks}): the "
                         f"batches of steps {_steps(sorted(self.replay))} are not trained on")

    @property
    def rollbacks(self) -> int:
        return len(self.record["rollbacks"])

    @property
    def logged_through(self) -> int:
        """The last step whose metrics went to MLflow before the latest rollback (-1: none): the rollback is raised
        at its step before that step is logged."""
        return max((r["step"] - 1 for r in self.record["rollbacks"]), default=-1)

    def is_replayed_bad_step(self, step: int) -> bool:
        """Whether the batch of global step ``step`` (1-based) is to be consumed without training."""
        return step in self.replay

    def checkpointed(self, step: int) -> None:
        self.checkpoint_step = step

    def after_step(self, step: int, skipped: bool, replayed: bool) -> None:
        """After global step ``step``: count, warn (rank 0), and past ``train.max_bad_steps`` consecutive skipped
        steps raise :class:`RollbackError` (or :class:`NonFiniteTrainingError` when the rollbacks are used up)."""
        if replayed:
            if self.rank == 0:
                console.info(f"[train] step {step}: not trained (replay after a rollback: this step's batch gave "
                             "non-finite loss/gradients before)")
            return
        if not skipped:
            self.streak = []
            return
        self.streak.append(step)
        if self.rank == 0:
            console.warn(f"[train] warning: step {step}: non-finite loss/gradients on some rank; update skipped "
                         f"({len(self.streak)} consecutive)")
        if self.max_bad == 0 or len(self.streak) < self.max_bad:
            return
        n = self.rollbacks
        entry = {"step": step, "bad_steps": list(self.streak), "checkpoint_step": self.checkpoint_step}
        if n >= self.max_rollbacks:
            entry["stopped"] = True
            message = self._stop_message(self.streak, n)
            error: Exception = NonFiniteTrainingError(message)
        else:
            to = (f"the latest checkpoint (step {self.checkpoint_step})" if self.checkpoint_step
                  else "step 0 (no checkpoint yet)")
            message = (f"{len(self.streak)} consecutive steps with non-finite loss/gradients (steps "
                       f"{_steps(self.streak)}; train.max_bad_steps={self.max_bad}): rolling back to {to}, rollback "
                       f"{n + 1} of train.max_rollbacks={self.max_rollbacks}; the replay skips the batches of these "
                       "steps")
            error = RollbackError(message)
        self._write(entry)
        if self.rank == 0:
            (console.error if entry.get("stopped") else console.warn)(
                f"[train] {'error' if entry.get('stopped') else 'rollback'}: {message}")
        raise error

    def _write(self, entry: dict) -> None:
        """Rank 0 appends ``entry`` to the record; every rank waits for it (a rare path, the only collective
        here), so none raises -- and has the worker group torn down -- before the record is in storage."""
        import torch.distributed as dist

        self.record["rollbacks"].append(entry)
        if self.rank == 0 and self.path is not None:
            from volvlp_ray.data import storage

            storage.write_json(self.path, self.record)
        if dist.is_initialized():
            dist.barrier()

    def _stop_message(self, streak: list[int], rollbacks: int, again: bool = False) -> str:
        earlier = [s for r in self.record["rollbacks"][:rollbacks] for s in r["bad_steps"]]
        return (f"{_MESSAGE_START} {len(streak)} consecutive steps (steps {_steps(streak)}) after {rollbacks} "
                f"rollback(s) (train.max_bad_steps={self.max_bad}, train.max_rollbacks={self.max_rollbacks})"
                + (f"; steps rolled back before: {_steps(earlier)}" if earlier else "")
                + (f"; recorded in {self.path}" if self.path else "")
                + (" (this run was stopped for it before)" if again else "")
                + ". The run stops: look for the cause (learning rate, data), or raise train.max_rollbacks and "
                "run it again with the same run_name to continue from its latest checkpoint without these steps")


def _steps(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps)
