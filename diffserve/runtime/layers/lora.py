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

K-append (bf16/fp32 base, in < out: _k_append_pays): the addmm_ above reads and writes the whole (M, out)
output once more per adapter (+14.7% of a FLUX.1-dev forward). Instead one buffer wcat = [W | B_0 | B_1 ..]
(out, in + slots*rank) holds the base weight and the B^T slots as views, and y = [x | t] @ wcat[:, :K]^T + b
with t = (x @ A_s^T) * scale_s for every slot s below the highest active one: one GEMM, whose GELU epilogue
(kernels/fused_ops.linear_gelu) the MLP input projections keep (activation="gelu"). Whole slots are read, so
load_slot zeroes what an adapter does not fill, and inactive slots have scale 0 (LoraManager.activate).

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

from diffserve.kernels.fused_ops import linear_gelu
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
        self.k_append = False  # plain base only: see _k_append_pays
        if isinstance(base, Fp8Linear):
            self.register_buffer(
                "lora_bt", torch.zeros(*shape, self.out_features, dtype=dtype, device=device), False
            )
            self.wcat = None
        else:
            # K-append: [W | B_0 | B_1 | ...] in one buffer; the base weight and the B^T slots are views of
            # it, so one GEMM over [x | t] adds the adapters and W is held once.
            w = base.weight.detach()
            width = self.in_features + state.slots * rank
            width += -width % 8  # 16-byte aligned rows (bf16) for cuBLAS; the pad columns are never read
            wcat = torch.zeros(self.out_features, width, dtype=w.dtype, device=w.device)
            wcat[:, : self.in_features].copy_(w)
            base.weight = nn.Parameter(wcat[:, : self.in_features], requires_grad=False)
            self.register_buffer("wcat", wcat, False)
            self.register_buffer(
                "lora_bt",
                wcat[:, self.in_features : self.in_features + state.slots * rank].t().view(*shape, -1),
                False,
            )
            self.k_append = _k_append_pays(self.in_features, self.out_features)
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
            # K-append reads whole slots (scale 0 for inactive ones): stale factors must be zeros
            self.lora_a[slot].zero_()
            self.lora_bt[slot].zero_()
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_bt[slot, :r].copy_(bt, non_blocking=True)
        self.lora_a[slot, r:].zero_()  # a larger adapter's rows may remain there
        self.lora_bt[slot, r:].zero_()
        self.ranks[name] = r

    def forward(
        self,
        x: torch.Tensor | Quantized,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        activation: str | None = None,
    ) -> torch.Tensor:
        """activation="gelu": GELU(tanh) of the output, in the GEMM's epilogue on the K-append path."""
        if activation not in (None, "gelu"):
            raise ValueError(f"activation must be None or 'gelu', not {activation!r}")
        if activation is not None and out is not None:
            raise ValueError("activation and out= cannot be combined")
        terms = self._terms()
        if terms and self.k_append and isinstance(x, torch.Tensor) and x_scale is None:
            return self._forward_k_append(x, 1 + max(slot for slot, _ in terms), out, activation)
        if isinstance(self.base, Fp8Linear):
            y = self.base(x, x_scale, out_dtype=out_dtype, out=out)
        else:
            y = _linear(x, self.base.weight, self.base.bias, out)
        if terms:
            self._add_terms(x, x_scale, y, terms)
        return y if activation is None else F.gelu(y, approximate="tanh")

    def _terms(self) -> list[tuple[int, int]]:
        """(slot, rank on this layer) of each active adapter that touches this layer."""
        return [(slot, self.ranks[name]) for name, slot in self.state.active if name in self.ranks]

    def _scaled(self, t: torch.Tensor, nslots: int) -> torch.Tensor:
        """t (M, nslots * rank), slot s's columns times its float32 scale: the product in float32 (the 3-d
        scales promote it), rounded once to t's dtype."""
        m, rank = t.shape[0], self.lora_a.shape[1]
        out = torch.empty_like(t)
        scales = self.state.scales[:nslots].view(1, nslots, 1)
        torch.mul(t.view(m, nslots, rank), scales, out=out.view(m, nslots, rank))
        return out

    def _add_terms(self, x, x_scale, y: torch.Tensor, terms: list[tuple[int, int]]) -> None:
        # One (M, r) product and one addmm_ per adapter: the addmm_ reads and writes all of y again.
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

    def add_low_rank(self, parts: list[torch.Tensor], y: torch.Tensor) -> None:
        """y += the active adapters' terms for the input [part_0 | part_1 | ...], never concatenated: each
        part against its columns of A, then one addmm_ for the slots below the highest active one (the
        others have scale 0). For mlp.linear_concat's split GEMMs (FLUX's single-block output projection,
        whose 15,360-wide concatenated input would otherwise be written and read again)."""
        terms = self._terms()
        if not terms:
            return
        nslots, rank = 1 + max(slot for slot, _ in terms), self.lora_a.shape[1]
        a = self.lora_a[:nslots].reshape(nslots * rank, self.in_features)
        t, col = None, 0
        for part in parts:
            rows = part.reshape(-1, part.shape[-1])
            cols = a[:, col : col + rows.shape[1]].to(rows.dtype).t()
            t = rows @ cols if t is None else t.addmm_(rows, cols)
            col += rows.shape[1]
        bt = self.lora_bt[:nslots].reshape(nslots * rank, self.out_features).to(y.dtype)
        y.view(-1, self.out_features).addmm_(self._scaled(t, nslots).to(y.dtype), bt)

    def _forward_k_append(
        self, x: torch.Tensor, nslots: int, out: torch.Tensor | None, activation: str | None
    ) -> torch.Tensor:
        """y = [x | t] @ [W | B_0 .. B_{S-1}]^T + b, t = (x @ A_s^T) * scale_s per slot s < S: one GEMM.
        Whole slots (zero rows past an adapter's rank; zero scale for an inactive slot) keep the shapes a
        function of state.active alone, as CUDA graphs need."""
        k, rank = self.in_features, self.lora_a.shape[1]
        rows = x.reshape(-1, k)
        t = rows @ self.lora_a[:nslots].reshape(nslots * rank, k).to(rows.dtype).t()  # (M, S*rank)
        # Contiguous outputs and a cat: writing into column slices of a wide buffer measured 2-3x slower (H200).
        buf = torch.cat([rows, self._scaled(t, nslots)], dim=1)
        weight, bias = self.wcat[:, : k + nslots * rank], self.base.bias
        if activation == "gelu":
            return linear_gelu(buf, weight, bias).view(*x.shape[:-1], self.out_features)
        if out is not None:
            _linear(buf, weight, bias, out)
            return out
        return _linear(buf, weight, bias, None).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.state.slots}"


def _k_append_pays(in_features: int, out_features: int) -> bool:
    """K-append copies x (M x in) where the addmm_ path re-reads and re-writes y (M x out): it pays when
    in < out (FLUX's q|k|v, MLP inputs). Elsewhere the addmm_ path stays."""
    return in_features < out_features


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
    groups = {(f"{o}.{p}" if o else p): (owner, p, members) for o, owner, p, members in _fused_groups(model)}
    device = state.scales.device
    for name, rank in ranks.items():
        if name in groups:  # bf16 fused projection: a called nn.Linear over the fused weight
            owner, prefix, members = groups[name]
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
            row = 0
            for _, member in members:  # the members' row views follow the weight into wcat: one copy held
                rows = member.out_features
                member.weight = nn.Parameter(layer.base.weight[row : row + rows], requires_grad=False)
                row += rows
        else:
            layer = LoraLinear(model.get_submodule(name), state, rank, dtype, device)
            _set_submodule(model, name, layer)
        layer.name = name
        wrapped[name] = layer
    return wrapped
