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
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["BatchProducer", "adopt", "to_device"]

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchProducer:
    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], depth: int = 2, name: str = "batches"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
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
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if item is _END:
            self._queue.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.exc
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

