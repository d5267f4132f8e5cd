"""One model over several processes: rank 0 is the runner its caller sees, the other ranks follow it.

    runner = load_parallel_runner(RuntimeConfig(model, ulysses_degree=2, cfg_parallel=True))

returns, in rank 0, an object with the Runner interface (model_id, family, task, defaults, generate,
warmup, ...) — so `diffserve generate` and the server's worker use it as they use load_runner's. Two ways
to get the other ranks:

* spawned (the default): rank 0 is the calling process and starts world_size - 1 follower processes on
  this node, rank r on device index base + r (cuda -> cuda:0..N-1, cuda:2 -> cuda:2..). Followers exit
  when rank 0 closes the runner, and on their own when rank 0's process dies.
* torchrun (RANK/WORLD_SIZE in the environment; how a group spans nodes): every process calls this
  function; rank 0 gets the runner, the others follow inside the call and exit (SystemExit(0)) when rank 0
  closes it.

Every rank loads the whole model and runs every request; rank 0 broadcasts each request (with the seed
fixed, so all ranks draw the same noise) and, at every step, its cancel decision, so all ranks stop at
the same step. Only rank 0 reports progress and returns outputs.

Known limit: a failure that hits one rank only in the middle of a generation (e.g. out of memory on one
GPU) leaves the others waiting in a collective until the device-group timeout (group.DEVICE_TIMEOUT).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing.util
import os
import pickle
import queue
import random
import socket
import threading
import time

import torch
import torch.distributed as dist

from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.distributed import group as pg
from diffserve.runtime.distributed.config import ParallelConfig, ParallelConfigError

logger = logging.getLogger(__name__)

READY_TIMEOUT = 3600.0  # seconds rank 0 waits for the followers to load a (large) model


def rank_device(device: str, local_rank: int) -> str:
    """The device of local rank `local_rank` when `device` names the group's first one."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    return f"{dev.type}:{(dev.index or 0) + local_rank}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_model(config: ParallelConfig, model: str | None) -> None:
    """Refuse a layout the model cannot take before any process starts or any weight loads."""
    from diffserve.runtime.loader import inspect_model

    spec = inspect_model(model)
    names = [n for n in spec.components() if n.startswith("transformer")] if spec.family != "generic" else []
    if not names:
        config.check_model(spec.family, 1, spec.model_id)
    for name in names:
        config.check_model(spec.family, int(spec.config(name)["num_attention_heads"]), spec.model_id)


def _load(runtime: RuntimeConfig, device: str, world_size: int):
    """load_runner in one rank of a group (spawned or under torchrun), on this rank's device. The config
    says the group is parallel, so load_runner leaves cuBLAS's workspace alone (ranks run eagerly)."""
    from diffserve.runtime.runner import load_runner

    if torch.device(device).type == "cpu":
        # N processes on the same cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return load_runner(dataclasses.replace(runtime, device=device))


# ---- messages from rank 0 -----------------------------------------------------------------------------


def send(state: pg.ParallelState, message, timeout: float | None = None) -> None:
    """Rank 0: broadcast a picklable message (None: stop) to every follower on the control group."""
    data = b"" if message is None else pickle.dumps(message)
    work = dist.broadcast(torch.tensor([len(data)]), src=0, group=state.control_group, async_op=True)
    # A bounded wait only for the goodbye: followers stuck elsewhere must not hang rank 0's exit.
    if timeout is None:
        work.wait()
    else:
        work.wait(datetime.timedelta(seconds=timeout))
    if data:
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=state.control_group)


def receive(state: pg.ParallelState):
    """Followers: the next message from rank 0 (None: stop)."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=state.control_group)
    if not size.item():
        return None
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=state.control_group)
    return pickle.loads(data.numpy().tobytes())


def synced_cancel(state: pg.ParallelState, should_cancel=None):
    """A cancel check every rank calls at the same step: rank 0 asks `should_cancel`, all get its answer."""

    def check() -> bool:
        flag = torch.tensor([int(bool(state.is_leader and should_cancel is not None and should_cancel()))])
        dist.broadcast(flag, src=0, group=state.control_group)
        return bool(flag.item())

    return check


class ParallelRunner:
    """Rank 0's runner: the Runner interface, each call mirrored on every follower."""

    def __init__(self, runner, state: pg.ParallelState, followers: list | None = None):
        self.runner = runner
        self.state = state
        self.parallel = state.config
        self._followers = followers or []
        self._closed = False
        # At exit, before multiprocessing joins this process's children (the followers, which would wait
        # forever for the stop message): exit priority >= 0 runs ahead of that join. Plain atexit runs after.
        multiprocessing.util.Finalize(None, self.close, exitpriority=10)

    def __getattr__(self, name):  # model_id, family, task, accepts_image, defaults, pipeline, ...
        return getattr(self.runner, name)

    def generate(self, req, on_step=None, should_cancel=None):
        if self._closed:
            raise RuntimeError("this parallel runner is closed")
        if req.seed is None:  # each rank would otherwise draw its own seed, and its own noise
            req = dataclasses.replace(req, seed=random.SystemRandom().randrange(2**32))
        send(self.state, ("generate", req))
        return self.runner.generate(
            req, on_step=on_step, should_cancel=synced_cancel(self.state, should_cancel)
        )

    def warmup(self, resolutions=None, max_batch: int = 1) -> None:
        # every rank warms the same (size, batch) shapes: each capture is a collective of the group
        send(self.state, ("warmup", (resolutions, max_batch)))
        self.runner.warmup(resolutions, max_batch=max_batch)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the followers and leave the process group."""
        if self._closed:
            return
        self._closed = True
        try:
            send(self.state, None, timeout=timeout)
        except Exception as exc:  # a follower already gone, or stuck: it is terminated below
            logger.warning("parallel runner: followers did not take the stop message (%s)", exc)
        finally:
            for p in self._followers:
                p.join(timeout)
                if p.is_alive():
                    p.terminate()
            pg.shutdown_distributed()


def follow(runner, state: pg.ParallelState) -> None:
    """A follower's life: run what rank 0 runs until it sends None."""
    while True:
        message = receive(state)
        if message is None:
            return
        kind, arg = message
        try:
            if kind == "generate":
                runner.generate(arg, should_cancel=synced_cancel(state))
            elif kind == "warmup":
                resolutions, max_batch = arg
                runner.warmup(resolutions, max_batch=max_batch)
        except Exception as exc:  # rank 0 meets the same error and reports it; stay for the next request
            logger.debug("rank %d: %s: %s", state.rank, type(exc).__name__, exc)


# ---- spawned followers --------------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    """Followers must not outlive rank 0 (killed by the server's supervisor, say): they would wait forever."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="diffserve-parent-watch", daemon=True).start()


def _follower_main(rank, config, init_method, runtime: RuntimeConfig, device, status, parent) -> None:
    _exit_with_parent(parent)
    logging.basicConfig(level=logging.WARNING)
    try:
        runner = _load(runtime, device, config.world_size)
    except Exception as exc:
        status.put(("failed", rank, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    status.put(("ready", rank, None))
    state = pg.init_distributed(
        config, device, rank=rank, world_size=config.world_size, init_method=init_method
    )
    try:
        follow(runner, state)
    except RuntimeError as exc:  # gloo: "Connection closed by peer" when rank 0 is gone
        logger.error("rank %d: lost rank 0 (%s); exiting", rank, str(exc).splitlines()[0][:200])
        raise SystemExit(1) from None
    finally:
        pg.shutdown_distributed()


def _wait_ready(status, followers, deadline: float) -> None:
    from diffserve.runtime.loader import ModelLoadError

    pending = {p.name for p in followers}
    while pending:
        try:
            kind, rank, message = status.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in followers if p.name in pending and not p.is_alive()]
            if dead:
                raise ModelLoadError(
                    f"{dead[0].name} exited (code {dead[0].exitcode}) while loading"
                ) from None
            if time.monotonic() > deadline:
                raise ModelLoadError(
                    f"{', '.join(sorted(pending))} did not load within {READY_TIMEOUT:.0f} s"
                ) from None
            continue
        if kind == "failed":
            raise ModelLoadError(f"rank {rank} failed to load the model: {message}")
        pending.discard(f"diffserve-rank-{rank}")


def _spawn(config: ParallelConfig, runtime: RuntimeConfig, device: str) -> ParallelRunner:
    import multiprocessing as mp

    from diffserve.runtime.loader import ModelLoadError

    first = torch.device(device)
    available = {"cuda": torch.cuda.device_count, "xpu": lambda: torch.xpu.device_count()}.get(first.type)
    if available is not None:
        try:
            config.check_devices(first.type, available() - (first.index or 0))
        except ParallelConfigError as e:
            raise ModelLoadError(str(e)) from None
    ctx = mp.get_context("spawn")
    status, init_method = ctx.Queue(), f"tcp://127.0.0.1:{free_port()}"
    followers = []
    for rank in range(1, config.world_size):
        p = ctx.Process(
            target=_follower_main,
            args=(
                rank,
                config,
                init_method,
                runtime,
                rank_device(device, rank),
                status,
                os.getpid(),
            ),
            name=f"diffserve-rank-{rank}",
        )
        p.start()
        followers.append(p)
    try:
        runner = _load(runtime, rank_device(device, 0), config.world_size)
        _wait_ready(status, followers, time.monotonic() + READY_TIMEOUT)
        state = pg.init_distributed(
            config, rank_device(device, 0), rank=0, world_size=config.world_size, init_method=init_method
        )
    except BaseException:
        for p in followers:
            p.terminate()
        raise
    logger.info(
        "parallel runner: %s over %s",
        config.describe(),
        ", ".join(rank_device(device, r) for r in range(config.world_size)),
    )
    return ParallelRunner(runner, state, followers)


# ---- entry point ----------------------------------------------------------------------------------------


def load_parallel_runner(
    model: str | RuntimeConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
    *,
    ulysses_degree: int = 1,
    cfg_parallel: bool = False,
    compile: bool = False,
):
    """load_runner over ulysses_degree * (2 if cfg_parallel else 1) processes (see the module docstring).
    With a world of one it is load_runner itself. `model` may be a whole RuntimeConfig (the server's
    worker and the CLI pass one; the other arguments are then ignored). Like load_runner, anything the user
    can fix (a layout the model or the machine cannot take) raises ModelLoadError with a one-line message."""
    from diffserve import envs
    from diffserve.runtime.loader import ModelLoadError, default_device
    from diffserve.runtime.runner import load_runner

    try:
        runtime = (
            model
            if isinstance(model, RuntimeConfig)
            else RuntimeConfig(model, device, dtype, attention_backend, compile, ulysses_degree, cfg_parallel)
        )
        config = runtime.parallel
        if config.enabled:
            check_model(config, runtime.model)
    except ValueError as e:  # ParallelConfigError, a bad dtype or backend name
        raise ModelLoadError(str(e)) from None
    if not config.enabled:
        return load_runner(runtime)
    device = runtime.device or default_device()
    torchrun = pg.env_rank()
    if torchrun is None:
        return _spawn(config, runtime, device)
    rank, world, local_rank = torchrun
    try:
        config.check_world_size(world)
    except ParallelConfigError as e:
        raise ModelLoadError(str(e)) from None
    mine = rank_device(device, local_rank)
    runner = _load(runtime, mine, envs.LOCAL_WORLD_SIZE or world)
    state = pg.init_distributed(config, mine, rank=rank, world_size=world)
    if rank == 0:
        return ParallelRunner(runner, state)
    try:
        follow(runner, state)
    finally:
        pg.shutdown_distributed()
    raise SystemExit(0)
