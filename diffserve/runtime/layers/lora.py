"""LoRA adapters as separate low-rank products on a DiT's linear layers (issue 20): y = base(x) + sum over the
batch's adapters of scale * (x @ A^T) @ B^T. The base weights never change, so switching adapters costs
nothing and no unmerge can drift.

  LoraState                       the adapter set of the running batch: ((name, slot), ...) and the scales
  LoraLinear(base, ...)           a linear layer (nn.Linear or Fp8Linear) with adapter slots
  wrap_linears(model, names, ...) the layers the models call for those (diffusers) names wrapped in place

Slots: each wrapped layer holds `slots` device buffers per factor (A as (slots, rank, in), B transposed as
(slots, rank, out), rank the largest of the adapters on that layer); runtime/lora.py copies an adapter's
factors into a slot when it becomes resident (LRU). An adapter that does not touch a layer, or touches it at
a smaller rank, uses only its own rows: `ranks[name]` says how many, so no FLOP is spent on padding.

CUDA graphs (runtime/cuda_graphs.py): a graph bakes in which kernels run and the addresses they read. Here
the kernels depend only on the active ((name, slot), ...) tuple, which is part of the graph key
(LoraState.graph_key, read by GraphedForward); the factors live at fixed addresses (slot buffers, filled in
place) and the scales in one fixed device tensor written before each batch. So a request's scales never
need a new graph, and an adapter swapped into a slot is seen by the graphs already captured for it.

Why LoraLinear is an Fp8Linear subclass: our FLUX and Wan blocks read the weights of plain nn.Linear layers
directly where they fuse work into a GEMM (q|k|v fused weights, GELU and residual epilogues), and CALL the
layers that are Fp8Linear (isinstance checks in models/flux.py, models/wan.py, layers/mlp.py). A LoRA'd layer
must be called, so it passes that check; whether the block hands it a pre-quantised input is a separate
question (fp8.fp8_layers reads `takes_quantized`): only when its base is FP8. Then the low-rank path reads
the same quantised input the FP8 GEMM reads, exactly: with per-token scales s, (diag(s) Xq) A^T =
diag(s) (Xq A^T), so the FP8 values are cast to the compute dtype and the (M, rank) product is scaled per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.runtime.layers.fp8 import Fp8Linear, Quantized, _fused_groups, _set_submodule


class LoraState:
    """What every wrapped layer of one model reads: `active`, the ((name, slot), ...) of the running batch
    (sorted by name: one order, one rounding, one graph per set), and `scales` (slots,) float32 on the model's
    device. Float32 scales: a bf16 scale would be off by up to 0.4% (8 bits of mantissa)."""

    def __init__(self, slots: int, device: torch.device | str):
        self.slots = slots
        self.active: tuple[tuple[str, int], ...] = ()
        self.scales = torch.zeros(slots, dtype=torch.float32, device=device)

    def graph_key(self) -> tuple[tuple[str, int], ...]:
        return self.active


class LoraLinear(Fp8Linear):
    """`base` (nn.Linear or Fp8Linear, possibly a fused q|k|v projection) plus the active adapters' low-rank
    products. Takes what the base takes: x, or (FP8 base) a Quantized / (xq, x_scale), out_dtype and out=."""

    def __init__(self, base: nn.Module, state: LoraState, rank: int, dtype: torch.dtype, device):
        nn.Module.__init__(self)  # not Fp8Linear.__init__: the base keeps its own weights (see the docstring)
        self.base = base
        self.state = state
        self.in_features, self.out_features = base.in_features, base.out_features
        self.takes_quantized = isinstance(base, Fp8Linear) and base.takes_quantized
        self.dtype = base.dtype if isinstance(base, Fp8Linear) else base.weight.dtype
        self.name = getattr(base, "name", "")
        shape = (state.slots, rank)
        self.register_buffer(
            "lora_a", torch.zeros(*shape, self.in_features, dtype=dtype, device=device), False
        )
        self.register_buffer(
            "lora_bt", torch.zeros(*shape, self.out_features, dtype=dtype, device=device), False
        )
        self.ranks: dict[str, int] = {}  # adapter name -> its rank on this layer (absent: it leaves it alone)

    @property
    def weight(self) -> torch.Tensor:
        # A caller reading the weight would run the base GEMM without the adapters: fail loudly instead.
        raise RuntimeError(
            f"{self.name or 'a LoRA layer'}: call the layer; its weight alone misses the adapters"
        )

    def load_slot(self, slot: int, name: str, a: torch.Tensor | None, bt: torch.Tensor | None) -> None:
        """Adapter `name`'s factors into `slot`, in place (fixed addresses: see the module docstring).
        a (rank, in), bt (rank, out) = B^T with its alpha/rank folded in; None: the adapter skips the layer."""
        if a is None:
            self.ranks.pop(name, None)
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_bt[slot, :r].copy_(bt, non_blocking=True)
        self.ranks[name] = r

    def forward(
        self,
        x: torch.Tensor | Quantized,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(self.base, Fp8Linear):
            y = self.base(x, x_scale, out_dtype=out_dtype, out=out)
        else:
            y = _linear(x, self.base.weight, self.base.bias, out)
        terms = [(slot, self.ranks[name]) for name, slot in self.state.active if name in self.ranks]
        if not terms:
            return y
        if isinstance(x, Quantized):
            x, x_scale = x
        rows = x.reshape(-1, self.in_features)
        if x_scale is not None:  # the FP8 GEMM's own input: q per row, scale per row (docstring)
            rows = rows.to(self.lora_a.dtype)
        y2 = y.view(-1, self.out_features)
        for slot, r in terms:
            t = rows @ self.lora_a[slot, :r].t()  # (M, r)
            if x_scale is not None:
                t = t * x_scale.reshape(-1, 1)
            t = (t * self.state.scales[slot]).to(y2.dtype)  # float32 scale, one rounding to the output dtype
            y2.addmm_(t, self.lora_bt[slot, :r].to(y2.dtype))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.state.slots}"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None):
    if out is None:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, weight.shape[1])
    if bias is None:
        return torch.mm(rows, weight.t(), out=out.view(-1, weight.shape[0])).view(out.shape)
    torch.addmm(bias, rows, weight.t(), out=out.view(-1, weight.shape[0]))
    return out


def called_layers(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Every linear layer name of `model` (diffusers' names, fused members included) -> (the name of the
    layer the model calls for it, first row, stop row of its output there). A member of a fused projection
    (models.base.fuse_linears, or its FP8 form) is computed by the fused GEMM, `<owner>.<prefix>`."""
    where: dict[str, tuple[str, int, int]] = {}
    for owner_name, _owner, prefix, members in _fused_groups(model):
        fused = f"{owner_name}.{prefix}" if owner_name else prefix
        row = 0
        for name, member in members:
            where[name] = (fused, row, row + member.out_features)
            row += member.out_features
    for owner_name, owner in model.named_modules():  # fused FP8 groups: their members are row views
        for prefix, layer in owner.named_children():
            if isinstance(layer, Fp8Linear) and not isinstance(layer, LoraLinear) and layer.name:
                fused = f"{owner_name}.{prefix}" if owner_name else prefix
                if layer.name == fused and _fp8_members(owner, owner_name, layer):
                    row = 0
                    for name, member in _fp8_members(owner, owner_name, layer):
                        where[name] = (fused, row, row + member.out_features)
                        row += member.out_features
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Fp8Linear)) and name not in where:
            where[name] = (name, 0, module.out_features)
    return where


def _fp8_members(owner: nn.Module, owner_name: str, fused: Fp8Linear) -> list[tuple[str, Fp8Linear]]:
    """The member row layers quantize_linears made of a fused FP8 layer (views of its qweight), in row order."""
    found = []
    base_ptr = fused.qweight.untyped_storage().data_ptr()
    for name, module in owner.named_modules():
        if module is fused or not isinstance(module, Fp8Linear) or not name:
            continue
        if module.qweight.untyped_storage().data_ptr() == base_ptr:
            found.append((f"{owner_name}.{name}" if owner_name else name, module))
    return sorted(found, key=lambda m: m[1].qweight.storage_offset())


def wrap_linears(
    model: nn.Module, ranks: dict[str, int], state: LoraState, dtype: torch.dtype
) -> dict[str, LoraLinear]:
    """Replace the layers the model calls for the (called) names in `ranks` by LoraLinear, in place, each
    with `state.slots` slots of that rank. A bf16 fused projection (`<prefix>_weight` buffers) becomes a
    called layer `<owner>.<prefix>` over the same tensor (no copy) and its buffers are set to None: the models
    then call it, as they call a fused FP8 projection. Returns {called name: LoraLinear}."""
    wrapped = {}
    groups = {(f"{o}.{p}" if o else p): (owner, p) for o, owner, p, _ in _fused_groups(model)}
    device = state.scales.device
    for name, rank in ranks.items():
        if name in groups:  # bf16 fused projection: a called nn.Linear over the fused weight
            owner, prefix = groups[name]
            weight, bias = getattr(owner, f"{prefix}_weight"), getattr(owner, f"{prefix}_bias", None)
            base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            base.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                base.bias = nn.Parameter(bias, requires_grad=False)
            setattr(owner, f"{prefix}_weight", None)
            if hasattr(owner, f"{prefix}_bias"):
                setattr(owner, f"{prefix}_bias", None)
            layer = LoraLinear(base, state, rank, dtype, device)
            owner.add_module(prefix, layer)
        else:
            layer = LoraLinear(model.get_submodule(name), state, rank, dtype, device)
            _set_submodule(model, name, layer)
        layer.name = name
        wrapped[name] = layer
    return wrapped
