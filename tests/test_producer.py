"""The background producer of ready batches (``train/producer.py``), the once-only batch-size agreement, and the
timeouts that end a stalled run (a data wait, a collective whose peer never comes)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from volvlp_ray.train.producer import BatchProducer, to_device


def test_order_kept_and_bounded_lookahead():
    prepared: list[int] = []
    consumed: list[int] = []
    lock = threading.Lock()
    ahead: list[int] = []

    def prepare(i: int) -> int:
        with lock:
            prepared.append(i)
            ahead.append(len(prepared) - len(consumed))
        return i * 10

    p = BatchProducer(range(20), prepare, depth=2)
    for item in p:
        time.sleep(0.01)  # a slow step: the producer fills its queue and waits
        with lock:
            consumed.append(item)
    assert consumed == [i * 10 for i in range(20)]
    # beyond what the consumer finished: the one it holds, `depth` queued, and the one being prepared
    assert max(ahead) == 2 + 2, ahead
    with pytest.raises(StopIteration):
        next(p)


def test_wait_time_counts_slow_input_and_not_fast_input():
    slow = BatchProducer(range(5), lambda i: time.sleep(0.05) or i, depth=2)
    list(slow)
    assert slow.wait_seconds >= 0.2  # the loop waited for every batch it got
    fast = BatchProducer(range(5), lambda i: i, depth=2)
    time.sleep(0.2)  # the producer ran ahead while the "step" ran
    t0 = time.perf_counter()
    list(fast)
    assert fast.wait_seconds <= time.perf_counter() - t0 + 1e-6
    assert fast.wait_seconds < 0.05


def test_an_error_in_the_producer_reaches_the_consumer_at_its_item():
    def prepare(i: int) -> int:
        if i == 3:
            raise OSError("shard unreadable")
        return i

    p = BatchProducer(range(10), prepare)
    got = []
    with pytest.raises(OSError, match="shard unreadable"):
        for item in p:
            got.append(item)
    assert got == [0, 1, 2]


def test_close_stops_the_thread_while_it_waits_on_a_full_queue():
    p = BatchProducer(iter(range(10**9)), lambda i: i, depth=1)
    assert next(p) == 0
    p.close(timeout=2)
    assert not p._thread.is_alive()


def test_a_stalled_input_ends_the_wait_with_an_error_naming_the_setting():
    """No silent hang: a source that stops yielding (Ray Data tasks that cannot be scheduled, a hung read) makes
    the consumer raise once ``timeout_s`` has passed without an item, the first item included."""
    from volvlp_ray.train.producer import DataWaitTimeout

    release = threading.Event()

    def stalls_after(n: int):
        yield from range(n)
        release.wait(30)  # a stalled stream (released at the end of the test)

    try:
        p = BatchProducer(stalls_after(2), lambda i: i, timeout_s=0.5)
        assert [next(p), next(p)] == [0, 1]
        t0 = time.perf_counter()
        with pytest.raises(DataWaitTimeout, match=r"train.timeout_s=0.5; 2 received before.*scaling.data_cpus"):
            next(p)
        assert 0.5 <= time.perf_counter() - t0 < 5
        first = BatchProducer(stalls_after(0), lambda i: i, timeout_s=0.3, setting="my.timeout")
        with pytest.raises(TimeoutError, match="my.timeout=0.3; 0 received before"):
            next(first)
        slow = BatchProducer(range(3), lambda i: time.sleep(0.2) or i, timeout_s=2)  # slow but within the limit
        assert list(slow) == [0, 1, 2]
        with pytest.raises(ValueError, match="timeout_s"):
            BatchProducer(range(1), lambda i: i, timeout_s=0)
    finally:
        release.set()


def test_to_device_on_cpu_returns_the_batch_as_is():
    t = {"volume": torch.zeros(2, 1, 4, 4, 4, dtype=torch.int16)}
    assert to_device(t, torch.device("cpu")) is t


def _batch_check_worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    from volvlp_ray.losses import build_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = {"n": 0}
    real = dist.all_gather

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    dist.all_gather = counting  # count the collectives the loss makes (the loss itself runs unchanged)
    loss = build_loss("sigmoid")
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    loss(x, x, scale, bias)
    first = calls["n"]
    loss(x, x, scale, bias)
    second = calls["n"] - first
    err = None
    if rank == 1:  # its batch shrinks: caught on the host, before any collective (rank 0 does not call again)
        try:
            loss(x[:3], x[:3], scale, bias)
        except ValueError as e:
            err = str(e)
    q.put((rank, first, second, err))
    dist.destroy_process_group()


def test_batch_size_agreed_once_then_checked_on_the_host():
    """The first loss call runs the size all-gather; later calls make only the features' gather; a rank whose
    batch then changes raises at once (the other ranks' collectives would otherwise hang)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_batch_check_worker, args=(r, 2, port, q)) for r in range(2)]
    [p.start() for p in procs]
    results = {}
    for _ in range(2):
        try:
            r, first, second, err = q.get(timeout=120)
        except Exception:  # noqa: BLE001
            break
        results[r] = (first, second, err)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert set(results) == {0, 1}, results
    for first, second, _ in results.values():
        assert first == second + 1  # the size agreement once, on the first call
    assert results[1][2] is not None and "changed from 4" in results[1][2]


def _timeout_worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    from volvlp_ray.train.loop import collective_timeouts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    collective_timeouts(3)  # what the training loop does before DeepSpeed makes its groups
    group = dist.new_group(ranks=list(range(world)))  # as DeepSpeed copies the world group: no timeout given
    if rank == 1:  # a peer that never joins the collective
        time.sleep(40)
        q.put((rank, None, None))
        return
    t0 = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        err = None
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    q.put((rank, time.perf_counter() - t0, err))


def test_a_collective_left_waiting_by_a_peer_times_out_after_train_timeout_s():
    """DeepSpeed's process groups are made without a timeout; after ``collective_timeouts`` they get
    ``train.timeout_s``: a rank whose peer never comes raises instead of waiting forever."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_timeout_worker, args=(r, 2, port, q)) for r in range(2)]
    [p.start() for p in procs]
    try:
        rank, seconds, err = q.get(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    assert rank == 0 and err is not None, (rank, seconds, err)
    assert 2.5 <= seconds < 30, (seconds, err)
