"""`--offload model|layerwise`: serve a model whose weights do not all fit on the GPU.

- model:     text encoders and VAE live in pinned host memory and visit the GPU only for their stage
             (text encoding, VAE encode/decode); the DiT stays resident.
- layerwise: as model, and the DiT's blocks also live in pinned host memory: each block is copied to the
             GPU just before it runs, the next one is prefetched on a side stream meanwhile, and a block's
             GPU copy is dropped as soon as its kernels are queued (its memory reused once they ran). At
             most two blocks are held, and three block copies allocated (the third one finishing).

The unit moved is a tensor *storage*, not a parameter: our fused layers (models.base.fuse_linears, the
fused T5) make several parameters views into one buffer, and moving storages keeps those views shared
(moving each parameter would double the memory). Weights never change at inference, so "moving back" is
only re-pointing the tensors at their host copy and dropping the GPU one: no device-to-host copy.

Triggers: forward pre-hooks on every submodule (anything that calls a module), plus `onload(module)`
where our fused paths read weights without calling a module (text.TextEncoder.encode, stages'
VAE decodes); `release_all()` when the denoising loop starts and when a generation ends.

CUDA graphs: a graph replays fixed addresses, and an offloaded module gets new GPU storage at every
visit, so the offloaded text encoders run eagerly (their graphs off); with layerwise the DiT's graphs are
off too (the streamed blocks' addresses change at every step). In model mode the DiT keeps its graphs.

On the CPU the "device" is the host: the visit is a fresh copy of the storage, dropped afterwards, so the
mechanism (where each tensor lives, visits and returns, same outputs) is testable without a GPU.
"""

from __future__ import annotations

import collections
import logging
import weakref

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("model", "layerwise")
_managers: weakref.WeakSet = weakref.WeakSet()  # every live ComponentOffload (release_all)
# For tests on the CPU, where a weight read outside a visit would silently find the same numbers on the
# host: between visits the tensors then point at a copy whose bytes are all 0xFF (NaN in every float
# format, -1 in integers), so that such a read shows in the output.
POISON_BETWEEN_VISITS = False


class StorageGroup:
    """The tensors (parameters and buffers) of one module, grouped by the storage they view. Lives on the
    host (pinned where CUDA is) and visits `device` on demand."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        by_storage: dict[int, list[torch.Tensor]] = {}
        for t in tensors:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        # (host bytes as a flat uint8 tensor, the tensors viewing it)
        self.storages: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.homes: list[torch.Tensor] = []  # where the tensors point between visits: the host copy
        with torch.inference_mode(False), torch.no_grad():
            for views in by_storage.values():
                raw = _bytes(views[0])
                host = raw.to("cpu")
                if self.pin:
                    host = host.pin_memory()
                self.storages.append((host, views))
                self.homes.append(torch.full_like(host, 255) if POISON_BETWEEN_VISITS else host)
                _point(views, self.homes[-1])  # the device copy (if any) is freed with its last view
        self.on_device: list[torch.Tensor] | None = None  # the visiting copies, while on the device
        self.ready: torch.cuda.Event | None = None  # recorded on the copy stream after the copy

    @property
    def nbytes(self) -> int:
        return sum(host.numel() for host, _ in self.storages)

    def load(self, stream: torch.cuda.Stream | None = None) -> None:
        """Copy to the device (on `stream` if given: then wait_ready() before use) and re-point the tensors."""
        if self.on_device is not None:
            return
        with torch.inference_mode(False), torch.no_grad():
            if stream is None:
                copies = [_visit(host, self.device) for host, _ in self.storages]
            else:
                with torch.cuda.stream(stream):
                    copies = [_visit(host, self.device) for host, _ in self.storages]
                    self.ready = torch.cuda.Event()
                    self.ready.record(stream)
            for (_, views), copy in zip(self.storages, copies, strict=True):
                _point(views, copy)
        self.on_device = copies

    def wait_ready(self) -> None:
        """Make the current stream wait for a side-stream copy, and keep the allocator from reusing the
        copy's memory until the current stream's work on it is done."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            for copy in self.on_device or ():
                copy.record_stream(torch.cuda.current_stream())
            self.ready = None

    def release(self) -> None:
        """Point the tensors back at the host copy; the device copy is freed (after queued work, on CUDA)."""
        if self.on_device is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            for (_, views), home in zip(self.storages, self.homes, strict=True):
                _point(views, home)
        self.on_device, self.ready = None, None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _visit(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # On the CPU, .to() would return the host tensor itself: clone so the visit is a real, separate copy.
    return host.clone() if device.type == "cpu" else host.to(device, non_blocking=True)


def _point(views: list[torch.Tensor], raw: torch.Tensor) -> None:
    """Re-point each tensor (same dtype, offset, shape, strides) at raw's storage; tensor objects are kept,
    so every reference to a parameter or buffer sees the move."""
    storage = raw.untyped_storage()
    for t in views:
        t.data = torch.empty(0, dtype=t.dtype, device=raw.device).set_(
            storage, t.storage_offset(), t.size(), t.stride()
        )


def _move(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Tensors to `device` for good, one copy per storage (views stay views of one buffer)."""
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    with torch.inference_mode(False), torch.no_grad():
        for views in by_storage.values():
            if views[0].device != device:
                _point(views, _bytes(views[0]).to(device))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class ComponentOffload:
    """`model` mode: whole components (text encoders, VAE) on the host, one at a time on the device."""

    def __init__(self, components: dict[str, nn.Module], device):
        self.device = torch.device(device)
        self.groups = {name: StorageGroup(_tensors(m), self.device) for name, m in components.items()}
        self.visits = dict.fromkeys(components, 0)  # for tests: how often each component came over
        for name, module in components.items():
            module._diffserve_offload = (self, name)  # onload(module) finds its manager
            for sub in module.modules():
                sub.register_forward_pre_hook(lambda _m, _a, name=name: self.load(name))
        _managers.add(self)
        logger.info(
            "offload: %s in host memory (%.2f GB), on %s only while they run",
            ", ".join(components),
            sum(g.nbytes for g in self.groups.values()) / 1e9,
            self.device,
        )

    def load(self, name: str) -> None:
        """`name` onto the device; any other component there goes back first (one at a time)."""
        group = self.groups[name]
        if group.on_device is not None:
            return
        self.release()
        group.load()
        self.visits[name] += 1

    def release(self) -> None:
        for group in self.groups.values():
            group.release()

    def resident(self) -> list[str]:
        return [name for name, g in self.groups.items() if g.on_device is not None]


class BlockStreamer:
    """`layerwise` mode for a DiT: its blocks on the host, streamed in the order they run; the rest of it
    (embedders, the final layer, FLUX's fused adaLN weights, which every step reads up front) resident."""

    def __init__(self, dit: nn.Module, device):
        self.device = torch.device(device)
        self.blocks = [b for name, lst in dit.named_children() if name.endswith("blocks") for b in lst]
        if not self.blocks:
            raise ValueError(f"--offload layerwise: {type(dit).__name__} has no *blocks lists to stream")
        in_blocks = {id(t) for b in self.blocks for t in _tensors(b)}
        # A block tensor that views a storage shared with tensors outside its block (FLUX's adaLN
        # projections are views into one fused buffer) stays resident with that storage.
        outside = {t.untyped_storage().data_ptr() for t in _tensors(dit) if id(t) not in in_blocks}
        self.groups, streamed = [], set()
        for block in self.blocks:
            own = [t for t in _tensors(block) if t.untyped_storage().data_ptr() not in outside]
            streamed |= {id(t) for t in own}
            self.groups.append(StorageGroup(own, self.device))
        # Everything else of the DiT goes to the device now, once, and stays.
        _move([t for t in _tensors(dit) if id(t) not in streamed], self.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.loads = 0  # for tests: block copies made
        self.done: collections.deque = collections.deque()  # events after released blocks' kernels
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i))
            block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i))
        logger.info(
            "offload layerwise: %d DiT blocks (%.2f GB) streamed from host memory, two at a time on %s",
            len(self.blocks),
            sum(g.nbytes for g in self.groups) / 1e9,
            self.device,
        )

    def _load(self, i: int) -> None:
        if self.groups[i].on_device is None:
            self.groups[i].load(self.stream)
            self.loads += 1

    def _before(self, i: int) -> None:
        nxt = (i + 1) % len(self.blocks)  # after the last block: the first, for the next step
        # A block left over from an interrupted order (step caching runs only the first blocks on some
        # steps) goes back, so that at most block i and its successor are on the device.
        for j, group in enumerate(self.groups):
            if j not in (i, nxt):
                group.release()
        self._load(i)
        self.groups[i].wait_ready()
        # The host runs far ahead of the GPU (queueing a block takes well under its copy time), and a
        # released copy's memory is reusable only once the kernels that read it ran: without a brake the
        # host would allocate every block of a step before the GPU finished the first. So wait here
        # until all released blocks but the latest (i-1, whose kernels may still run) are done: at most
        # three block copies are allocated (i-1 finishing, i, and the prefetched one).
        while len(self.done) > 1:
            self.done.popleft().synchronize()
        self._load(nxt)  # the prefetch: its copy overlaps block i's kernels on the side stream

    def _after(self, i: int) -> None:
        # Block i's kernels are queued; its device copy is freed once they ran (record_stream in
        # wait_ready). With one block, it is its own successor: keep it.
        if len(self.blocks) > 1:
            self.groups[i].release()
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record()  # on the current stream, after block i's kernels
                self.done.append(event)

    def release(self) -> None:
        for group in self.groups:
            group.release()

    def resident(self) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g.on_device is not None]


def onload(module) -> None:
    """Bring an offloaded component to the device before code that reads its weights without calling it
    (our fused T5 and VAE walks); nothing for a module that is not offloaded."""
    owner = getattr(module, "_diffserve_offload", None)
    if owner is not None:
        manager, name = owner
        manager.load(name)


def release_all() -> None:
    """Every offloaded component back to the host (the denoising loop starts; a generation ended)."""
    for manager in list(_managers):
        manager.release()


def apply(pipeline, mode: str | None) -> None:
    """Set up `mode` on a loaded native pipeline whose offloaded components were loaded on the host
    (loader.load_components(..., offload=mode)); records pipeline.offload (None, or the managers)."""
    pipeline.offload = None
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"--offload must be one of {', '.join(MODES)}, got {mode!r}")
    from diffserve.runtime.cuda_graphs import GraphedForward

    device = pipeline.device
    components = {  # the whole-component visitors; the DiT (layerwise) is the BlockStreamer's alone
        name: c
        for name, c in pipeline.components.items()
        if isinstance(c, nn.Module) and offloaded(name, mode) and not name.startswith("transformer")
    }
    managers = [ComponentOffload(components, device)] if components else []
    if mode == "layerwise":  # every DiT: Wan2.2 A14B has two (transformer_2 for the low-noise steps)
        managers += [
            BlockStreamer(c, device)
            for name, c in pipeline.components.items()
            if name.startswith("transformer") and isinstance(c, nn.Module)
        ]
    pipeline.offload = managers
    # CUDA graphs that would replay addresses an offloaded module no longer holds: off, with one line each.
    for value in vars(pipeline).values():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, GraphedForward) or item.disabled is not None:
                continue
            module = getattr(item, "module", None)  # text.TextEncoder's encoder; None for the DiT's
            if mode == "layerwise" or (module is not None and module in components.values()):
                item.disable(f"--offload {mode} moves its weights between calls")


def offloaded(name: str, mode: str | None) -> bool:
    """Whether the loader keeps component `name` on the host (the DiTs too, with layerwise)."""
    if mode is None:
        return False
    if name.startswith("transformer"):
        return mode == "layerwise"
    return name.startswith(("text_encoder", "vae", "image_encoder"))
