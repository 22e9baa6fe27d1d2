"""Input off the critical path: a bounded background producer of ready batches.

    batches = BatchProducer(source, prepare, depth=2)
    for ready in batches:        # waits only when input is slower than the step
        ...
    batches.wait_seconds         # all the time the loop waited for its next batch

``source`` yields host-side items (the training stream's rows cut to the step's plan); ``prepare`` turns one into
what the step consumes (``collate``: voxels read from the shards into a reused, on a GPU pinned, int16 buffer;
then, on a GPU, the copy to the device on a side stream, waited for in the producer thread, so the step never
waits for it and the host buffer is free again once the copy is done). Both run in one daemon thread, at most
``depth`` items ahead. An exception in the thread is raised in the consumer at the item where it happened.
``close()`` stops the thread (it is also stopped when the consumer is garbage-collected).

``timeout_s``: when no item arrives for that long, ``next`` raises :class:`DataWaitTimeout` (naming ``setting``,
``train.timeout_s`` in the training loop) instead of waiting forever: a stalled input (Ray Data tasks that cannot
be scheduled, a peer that stopped agreeing on steps, a hung read) ends the run with an error. The first item gets
the same allowance (the loop asks for it as soon as the producer starts).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["BatchProducer", "DataWaitTimeout", "adopt", "to_device"]

_END = object()


class DataWaitTimeout(TimeoutError):
    """No batch came from the input within the allowed time."""


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchProducer:
    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], depth: int = 2, name: str = "batches",
                 timeout_s: float | None = None, setting: str = "train.timeout_s"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.timeout_s, self.setting, self.name = timeout_s, setting, name
        self.consumed = 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source, self._prepare = source, prepare
        self.wait_seconds = 0.0
        self.produced = 0
        self._thread = threading.Thread(target=self._run, name=f"volvlp-{name}", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for raw in self._source:
                if self._stop.is_set():
                    return
                if not self._put(self._prepare(raw)):
                    return
                self.produced += 1
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            item = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            self.wait_seconds += time.perf_counter() - t0
            self._stop.set()
            raise DataWaitTimeout(
                f"{self.name}: nothing came from the input for {self.timeout_s:g}s ({self.setting}={self.timeout_s:g}; "
                f"{self.consumed} received before): the input is stalled. Can its Ray Data tasks be scheduled? "
                "(`ray status` shows CPU demands pending when the training workers hold every CPU: raise "
                "scaling.data_cpus or give the cluster more CPUs.) Did another worker stop? If the input is only "
                f"slow, raise {self.setting}") from None
        self.wait_seconds += time.perf_counter() - t0
        if item is _END:
            self._queue.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.exc
        self.consumed += 1
        return item

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout)

    def __del__(self) -> None:  # pragma: no cover - best effort
        self._stop.set()


def to_device(tensors: dict[str, torch.Tensor], device: torch.device, stream: "torch.cuda.Stream | None" = None,
              keep_on_host: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device``. On a GPU with ``stream`` (a side stream, called from the producer thread):
    the copies are issued on it and waited for *in this thread*, so the consumer's stream can use the tensors at
    once (it must ``record_stream`` them, see ``adopt``) and pinned host buffers can be reused. On the CPU the
    tensors are returned as they are. ``keep_on_host``: keys left where they are (host-side metadata)."""
    if device.type == "cpu":
        return tensors
    out = {}
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for k, v in tensors.items():
            out[k] = v if k in keep_on_host else v.to(device, non_blocking=True)
        if stream is not None:
            stream.synchronize()
    return out


def adopt(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In the consumer: tell the caching allocator that the current stream uses tensors allocated on the side
    stream (so their memory is not reused while the step's kernels may still read them)."""
    if torch.cuda.is_available():
        current = torch.cuda.current_stream()
        for v in tensors.values():
            if v.is_cuda:
                v.record_stream(current)
    return tensors

