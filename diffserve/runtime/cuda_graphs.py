"""CUDA graphs for the DiT forward, and the check that the denoising loop never waits for the GPU.

    from diffserve.runtime.cuda_graphs import GraphedForward
    dit = GraphedForward(transformer)           # once per pipeline
    out = dit(hidden_states=x, timestep=t, ..., return_dict=False)[0]

Why: a DiT forward is thousands of kernel launches; replaying them as one CUDA graph takes Python and the
launch latency out of the step, so the GPU never waits for the host inside a forward. It matters most
where kernels are short (small images, few tokens). Measured by benchmarks/bench_dit.py (ours-graph)
and benchmarks/bench_pipeline.py --end-to-end.

How a call runs (GraphedForward.__call__):
  * Eager (the plain call, output returned as is) unless every tensor argument is a CUDA tensor on one
    device and graphs make sense: see `why_eager` for the list (DIFFSERVE_CUDA_GRAPHS=0, autograd on, more
    than one distributed rank, inside torch.compile tracing or inside another capture, positional or
    unhashable arguments). On the CPU a GraphedForward is therefore exactly the module.
  * The graph is keyed by what a capture bakes in: the name, shape, stride, dtype and device of every
    tensor argument, the value of every other argument, and whether inference mode is on.
  * First call of a key: copy the inputs into static buffers, run the forward once eagerly on a side
    stream (lazy initialisation, cuBLAS workspaces, Triton compilation and autotuning all happen there,
    outside the capture, as the torch.cuda.graph docs prescribe), then capture it into a CUDAGraph with
    its own memory pool. A pool shared between graphs is only safe when they always replay in capture
    order, which per-shape graphs called in any order do not.
  * Every call of a captured key, the first one included (a new layout costs a warm-up forward, a capture
    and a replay): copy the inputs into the static buffers (device-to-device, cheap next to a forward),
    replay, and return a CLONE of the static output. The clone matters: classifier-free guidance calls
    the same graph twice per step, and a returned alias of the static output would be overwritten by the
    second call.
  * A capture that raises (an op that synchronises, an unsupported op, out of memory) logs one warning
    with the reason, marks the key as not capturable and runs the call eagerly; a request never fails
    because of graphs. An error of the eager warm-up itself (a bad argument) propagates, as it would
    without graphs.
  * At most `max_graphs` graphs are kept (least recently used first out); evicting one frees its pool.

What a graph holds on to: the static inputs and outputs, and the ADDRESSES of every tensor the forward
read, the weights included. In-place updates of the weights (load_state_dict copies) are seen by later
replays; replacing a parameter tensor (model.to(), fuse_projections() after the first call, swapping a
LoRA by assignment) is not: call reset() after changing the model that way. LoRA adapters (layers/lora.py)
are filled into fixed slot buffers in place, and the active set is part of the key (state_key).

Memory: each graph keeps its pool (the forward's peak activations at that shape) for as long as it is
cached, where eager execution would hand that memory back between forwards; max_graphs bounds it.

Inference only: graphs are captured and replayed under the caller's grad mode, and not at all while
autograd is recording (training through graphs needs torch.cuda.make_graphed_callables).
Not thread-safe: one GraphedForward serves one worker thread (the static buffers are shared state).

The host-sync check (`no_host_sync`, used by stages.denoise): with DIFFSERVE_CHECK_SYNC=1 every CUDA
operation that makes the host wait for the GPU (.item(), bool(cuda_tensor), a blocking copy to or from
the CPU, torch.cuda.synchronize) raises inside the loop, through torch.cuda.set_sync_debug_mode("error").
Deliberate waits (a capture, which synchronises by design) lift it with `sync_allowed()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from diffserve import envs

logger = logging.getLogger(__name__)

GRAPHS_ENV = "DIFFSERVE_CUDA_GRAPHS"  # "0" turns graphs off (default on); declared in diffserve/envs.py
CHECK_SYNC_ENV = "DIFFSERVE_CHECK_SYNC"  # "1" raises on any host synchronisation in the denoising loop


def graphs_enabled() -> bool:
    """DIFFSERVE_CUDA_GRAPHS, read at every call so that it can be switched off without a restart."""
    return envs.get(GRAPHS_ENV)


BLAS_WORKSPACE_ENV = "DIFFSERVE_BLAS_WORKSPACE"  # "default" leaves cuBLAS's workspaces as torch sizes them
_NO_BLAS_WORKSPACE = {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}


def configure_blas_workspace(device, eager: bool = False) -> bool:
    """Run this process's cuBLAS and cuBLASLt GEMMs without a workspace, when `device` is a CUDA device and
    graphs are on; unless DIFFSERVE_BLAS_WORKSPACE=default or the user set either variable. Returns
    whether it set them. eager=True (the ranks of a parallel group, which run without graphs) leaves
    cuBLAS as it is: eagerly its workspace is faster (FLUX.1 forward 125.7 vs 133.4 ms without,
    benchmarks/RESULTS.md session 5).

    Why: with a workspace, cuBLAS (CUDA 13) runs most large bf16 GEMMs on Hopper as kernels with a dynamic
    tile scheduler, and clears part of the workspace with a memset before each of them. In a CUDA graph
    every memset is a node of its own and the GPU idles ~4 us around it: 229 memsets, ~0.9 ms of idle GPU,
    per FLUX.1 forward at 1024^2. Without a workspace cuBLAS picks the same tiles with a static scheduler:
    no memset, the same output bit for bit, and a 28-step FLUX.1 generation took 3.349 s instead of 3.405
    on one H100 and 3.384 instead of 3.418 on another (benchmarks/RESULTS.md, session 5). Eagerly the
    workspace is faster (no graph nodes to save), hence graphs only.

    torch reads both variables once, when it first sets up cuBLAS in the process, so this must run before
    the process's first GEMM (load_runner calls it before loading anything)."""
    if eager or torch.device(device).type != "cuda" or not graphs_enabled():
        return False
    if envs.get(BLAS_WORKSPACE_ENV) == "default":
        return False
    if any(envs.is_set(name) for name in _NO_BLAS_WORKSPACE):
        return False  # the user's sizes (e.g. CUBLAS_WORKSPACE_CONFIG=:4096:8 for deterministic runs)
    if torch.are_deterministic_algorithms_enabled():
        return False  # torch then insists on one of its deterministic workspace configs (:4096:8, :16:8)
    os.environ.update(_NO_BLAS_WORKSPACE)  # a write that configures cuBLAS (read by torch at its first GEMM)
    logger.info(
        "cuBLAS runs without a workspace (no memset before each GEMM in the CUDA graphs); "
        "%s=default keeps cuBLAS's own",
        BLAS_WORKSPACE_ENV,
    )
    return True


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def why_eager(args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why this call must run eagerly, or None when it may run as a graph. Cheapest checks first."""
    if not graphs_enabled():
        return f"{GRAPHS_ENV}=0"
    if args:
        return "positional arguments (graphs key on argument names)"
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return "no tensor arguments"
    device = tensors[0].device
    if device.type != "cuda" or any(t.device != device for t in tensors):
        return "not all tensor arguments are CUDA tensors on one device"
    if torch.is_grad_enabled():
        return "autograd is recording (graphs are for inference)"
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if torch.cuda.is_current_stream_capturing():
        return "inside another CUDA graph capture (the outer one records this call)"
    if _distributed_world() > 1:
        # Collectives (Ulysses all-to-all, the CFG all-gather) can be captured, but every rank must then
        # capture and replay in lockstep; not worth the risk for a forward that is long anyway.
        return "torch.distributed runs more than one rank"
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor) and not _plain(value):
            return f"argument {name!r} is neither a tensor nor a plain hashable value"
    return None


def _plain(value) -> bool:
    """A non-tensor argument a graph can bake in: hashable, and no tensors hidden inside containers (a
    tensor hashes by identity, and the graph would keep reading its address)."""
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(value, (tuple, frozenset)):
        return all(_plain(v) for v in value)
    return isinstance(value, Hashable) and not isinstance(value, (list, dict, set))


def graph_key(kwargs: dict[str, Any]) -> tuple:
    """Everything a capture bakes in: tensor layout (not values), other arguments' values, inference mode."""
    parts = []
    for name in sorted(kwargs):
        v = kwargs[name]
        if isinstance(v, torch.Tensor):
            parts.append((name, "tensor", tuple(v.shape), v.stride(), v.dtype, v.device))
        else:
            parts.append((name, "value", v))
    return (torch.is_inference_mode_enabled(), tuple(parts))


def state_key(fn) -> Hashable:
    """What the module's own state adds to the graph key: `graph_state_key()` of the module (or of a bound
    method's object), if it has one. LoRA sets it (runtime/lora.py): the active ((adapter, slot), ...) decide
    which kernels a forward launches, so each adapter set gets its own graphs (its scales and factors are
    read from fixed device buffers, so they need none)."""
    owner = getattr(fn, "__self__", fn)
    key = getattr(owner, "graph_state_key", None)
    return key() if callable(key) else None


@contextlib.contextmanager
def sync_allowed():
    """Lift the host-sync check (if it is on) around a deliberate synchronisation."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    if previous == 0:
        yield
        return
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def check_sync_enabled() -> bool:
    return envs.get(CHECK_SYNC_ENV)


@contextlib.contextmanager
def no_host_sync(device: torch.device | str):
    """With DIFFSERVE_CHECK_SYNC=1 and a CUDA device, any CUDA operation inside that synchronises the host
    with the GPU raises RuntimeError ("called a synchronizing CUDA operation"). Otherwise nothing."""
    if torch.device(device).type != "cuda" or not check_sync_enabled():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream that warms up and captures on `device`: the same for both, so that anything the warm-up
    sets up per stream (cuBLAS keeps a workspace per stream) is what the capture uses; one per device for
    the process (torch.cuda.graph empties the allocator's cache before each capture, so nothing stays
    stranded on it)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def _output_tensors(out) -> tuple[torch.Tensor, ...] | None:
    """The tensors of a forward's output when it is a tensor or a tuple/list of tensors, else None."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(out)
    return None


class CapturedForward:
    """One graph: its static input buffers, its static outputs, and how to replay it. Built in three
    steps by GraphedForward._capture: __init__ (buffers), warm_up(fn), capture(fn)."""

    def __init__(self, kwargs: dict[str, Any]):
        self.device = next(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
        # empty_like keeps a dense input's strides; an expanded input (stride 0, e.g. a timestep broadcast
        # to the batch) gets a contiguous buffer, which copy_ fills all the same.
        self.static = {
            k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.kind: type = tuple

    def _copy_in(self, kwargs: dict[str, Any]) -> None:
        for name, buffer in self.static.items():
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(kwargs[name])

    def warm_up(self, fn: Callable, kwargs: dict[str, Any]):
        """One eager forward on the side stream (the forward's own errors propagate: eager would raise them
        too). Returns its output."""
        self._copy_in(kwargs)
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            out = fn(**self.static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return out

    def capture(self, fn: Callable) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            previous = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph, stream=_side_stream(self.device)):  # pool=None: its own pool
                    out = fn(**self.static)
            finally:
                # When capture_end raises (a failed capture), torch.cuda.graph's __exit__ skips restoring
                # the stream: without this, all later work would go to the capture stream.
                torch.cuda.set_stream(previous)
        self.graph, self.kind, self.outputs = graph, type(out), _output_tensors(out)

    def __call__(self, kwargs: dict[str, Any]):
        self._copy_in(kwargs)
        self.graph.replay()
        outs = tuple(o.clone() for o in self.outputs)
        if issubclass(self.kind, torch.Tensor):
            return outs[0]
        return outs if self.kind is tuple else self.kind(outs)

    def release(self) -> None:
        """Free the graph and its pool (the static tensors are the pool's last users)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.static, self.outputs = None, {}, ()


class GraphedForward:
    """`fn` (a DiT) run through one CUDA graph per input layout where possible, eagerly otherwise.

    Counters for tests and benchmarks: `captures` (graphs captured), `replays`, `eager_calls`."""

    def __init__(self, fn: Callable, max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, CapturedForward] = OrderedDict()  # least recently used first
        self.uncapturable: dict[tuple, str] = {}  # key -> why its capture failed
        self.disabled: str | None = None  # why every call now runs eagerly (see disable)
        self.captures = self.replays = self.eager_calls = 0

    def __call__(self, *args, **kwargs):
        if self.disabled is not None or why_eager(args, kwargs) is not None:
            return self._eager(*args, **kwargs)
        key = (*graph_key(kwargs), state_key(self.fn))
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
        elif key in self.uncapturable or (graph := self._capture(key, kwargs)) is None:
            return self._eager(**kwargs)
        self.replays += 1
        return graph(kwargs)

    def _eager(self, *args, **kwargs):
        self.eager_calls += 1
        return self.fn(*args, **kwargs)

    def _capture(self, key: tuple, kwargs: dict[str, Any]) -> CapturedForward | None:
        """A new graph for `key`, or None (after one warning) when this layout cannot be captured."""
        # Make room first, so that the capture can reuse the memory of the evicted graph's pool.
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)[1].release()
        graph = CapturedForward(kwargs)
        with sync_allowed():  # warm-up and capture synchronise by design
            try:
                out = graph.warm_up(self.fn, kwargs)
            except torch.OutOfMemoryError as e:  # the eager call on the main stream may still fit
                return self._give_up(key, graph, e)
            # Any other error of the warm-up is the forward's own: it propagates, as it would eagerly.
            if _output_tensors(out) is None:
                kind = type(out).__name__
                return self._give_up(key, graph, TypeError(f"output is a {kind}, not tensors"))
            del out
            try:
                graph.capture(self.fn)
            except Exception as e:  # noqa: BLE001 - whatever the cause, this layout runs eagerly
                return self._give_up(key, graph, e)
        self.graphs[key] = graph
        self.captures += 1
        return graph

    def _give_up(self, key: tuple, graph: CapturedForward, error: Exception) -> None:
        # A capture that failed inside torch (capture_end raising) does not hand its pool back (torch
        # releases a pool only after a successful capture_end): memory up to one forward's activations
        # may stay reserved. Once per layout, since the key is never tried again.
        graph.release()
        if isinstance(error, torch.OutOfMemoryError):
            # The other graphs' pools hold memory the eager call may need: free them all (they are
            # recaptured when their layouts come back) along with what the side stream cached.
            self._release_graphs()
            torch.cuda.empty_cache()
        message = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {message[0] if message else ''}"
        self.uncapturable[key] = reason
        logger.warning(
            "CUDA graph capture of %s failed (%s); these inputs run eagerly", _name(self.fn), reason
        )

    def disable(self, reason: str) -> bool:
        """Free every graph and run eagerly from now on (e.g. after the pools left the rest of a generation
        out of memory). Returns whether any graph was freed."""
        had = bool(self.graphs)
        self.reset()
        if self.disabled is None:
            logger.warning("CUDA graphs of %s off for this process: %s", _name(self.fn), reason)
        self.disabled = reason
        return had

    def reset(self) -> None:
        """Drop every graph (after the wrapped model's tensors were replaced) and forget capture failures."""
        self._release_graphs()
        self.uncapturable.clear()

    def _release_graphs(self) -> None:
        for graph in self.graphs.values():
            graph.release()
        self.graphs.clear()


def _name(fn) -> str:
    owner = getattr(fn, "__self__", None)  # a bound method: name its object (e.g. a TextEncoder)
    if isinstance(fn, torch.nn.Module) or owner is not None:
        return type(fn if owner is None else owner).__name__
    return getattr(fn, "__name__", repr(fn))
