"""LoRA adapters as separate low-rank products on a DiT's linear layers (issue 20): y = base(x) + sum over the
batch's adapters of scale * (x @ A^T) @ B^T. The base weights never change, so switching adapters costs
nothing and no unmerge can drift.

  LoraState                       the adapter set of the running batch: ((name, slot), ...) and the scales
  input_buffer(layers, like)      where a producer should write its LoRA layers' input (wide inputs, below)
  LoraLinear(base, ...)           a linear layer (nn.Linear or Fp8Linear) with adapter slots
  wrap_linears(model, names, ...) the layers the models call for those (diffusers) names wrapped in place

Slots: each wrapped layer holds `slots` device buffers per factor (A as (slots, rank, in), B transposed as
(slots, rank, out), rank the largest of the adapters on that layer); runtime/lora.py copies an adapter's
factors into a slot when it becomes resident (LRU). An adapter that does not touch a layer, or touches it at
a smaller rank, uses only its own rows: `ranks[name]` says how many, so no FLOP is spent on padding.

K-append (bf16/fp32 base, in <= out: _k_append_pays): the addmm_ above reads and writes the whole (M, out)
output once more per adapter (+14.7% of a FLUX.1-dev forward). Instead one buffer wcat = [W | B_0 | B_1 ..]
(out, in + slots*rank) holds the base weight and the B^T slots as views, and y = [x | t] @ wcat[:, :K]^T + b
with t = x @ (scale_s A_s)^T for every slot s below the highest active one: one GEMM, whose GELU epilogue
(kernels/fused_ops.linear_gelu) the MLP input projections keep (activation="gelu"). Whole slots are read, so
load_slot zeroes what an adapter does not fill, and inactive slots have scale 0 (LoraState.set). A layer with
no active term runs its base GEMM (GELU epilogue included) over the W view: a FLUX.1-dev forward with an
adapter attached but idle is within ~1% of the base (the wider row stride; -0.6 to +1.0% across runs), H200.

N-append (a plain base much wider in than out that the model names, lora_n_append: FLUX's single-block
output projection, 15,360 -> 3,072): the scaled A slots are rows of one buffer ncat = [W; A_0; A_1 ..; 0],
so the GEMM writes [y | t] reading x once, and y += t B^T follows (kernels/low_rank.lora_up, one pass over
y). A down-projection would read the 15,360-wide x again: 666.6 against 730.3 us at FLUX.1-dev's shape (H200).

Scales: each layer holds its A factors twice, as loaded (`lora_a`) and times their slot's scale
(`lora_as`, what the forwards read): LoraState.set rewrites the scaled copies when a batch's scales differ
from the last batch's, so no forward spends a kernel on scaling (1.35 ms of a rank-32 FLUX.1-dev forward,
H200 profile, 2026-12-04). One rounding of scale * A into A's dtype, as the product was rounded before.

Wide inputs (K-append without the join): a producer that knows its output feeds a K-append layer writes
it into the left columns of a wider buffer (`input_buffer`), so [x | t] needs only t written. The adaLN
passes of FLUX's blocks do so for q|k|v and the MLP input (the single block's two share one buffer and
one down-projection: share_input); an MLP input projection whose output feeds a LoRA output projection
(FeedForward: `chain`) computes `pad` more output columns against zero weight rows (GELU(0) = 0), and
hands the wider output on: that layer's addmm_ over its output becomes K-append too. A buffer is taken
only by the layer it was made for (`_given`).

Down-projections ahead (downs_together): independent calls whose layers are twins (FLUX's dual block: the
image and text streams' output projections, MLP inputs and MLP outputs) run their down-projections in one
launch first (kernels/low_rank.lora_downs), each layer keeping its [x | t] for its call (`_ready`). H200:
23.1 against 29.0 us for the output projections' joins, 12.8 against 19.5 for the MLP inputs, 32.7
against 43.2 for the MLP outputs (benchmarks/lora_down_rates.py --pairs): 0.44 ms of a forward.

CUDA graphs (runtime/cuda_graphs.py): a graph bakes in which kernels run and the addresses they read. Here
the kernels depend only on the active ((name, slot), ...) tuple, which is part of the graph key
(LoraState.graph_key, read by GraphedForward); the factors live at fixed addresses (slot buffers, filled in
place), the scaled ones too (rewritten in place before a batch whose scales changed). So a request's
scales never need a new graph, and an adapter swapped into a slot is seen by the graphs already captured for it.

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
from diffserve.kernels.low_rank import lora_down, lora_downs, lora_up
from diffserve.runtime.layers.fp8 import Fp8Linear, Quantized, _fused_groups, _set_submodule


class LoraState:
    """What every wrapped layer of one model reads: `active`, the ((name, slot), ...) of the running batch
    (sorted by name: one order, one rounding, one graph per set), and `scales` (slots,) float32, the scale
    of each slot (0: inactive), folded into the layers' scaled A copies by `set`. Float32 scales: a bf16
    scale would be off by up to 0.4% (8 bits of mantissa)."""

    def __init__(self, slots: int, device: torch.device | str):
        self.slots = slots
        self.device = torch.device(device)  # where the layers' factors live
        self.active: tuple[tuple[str, int], ...] = ()
        self.scales = torch.zeros(slots, dtype=torch.float32)
        self.layers: list[LoraLinear] = []  # registered by LoraLinear
        self.stale = True  # a slot's factors changed since the scaled copies were written

    def graph_key(self) -> tuple[tuple[str, int], ...]:
        return self.active

    def set(self, active: tuple[tuple[str, int], ...], scales: dict[int, float]) -> None:
        """The next forwards' adapter set and {slot: scale} (others 0). Rewrites every layer's scaled A
        copies when the scales or any slot's factors changed (a few foreach kernels a slot)."""
        values = torch.zeros(self.slots, dtype=torch.float32)
        for slot, scale in scales.items():
            values[slot] = scale
        self.active = active
        if not self.stale and torch.equal(values, self.scales):
            return
        self.scales = values
        by_dtype: dict[torch.dtype, list[LoraLinear]] = {}
        for layer in self.layers:
            by_dtype.setdefault(layer.lora_a.dtype, []).append(layer)
        with torch.no_grad():
            for layers in by_dtype.values():
                for slot in range(self.slots):
                    dst = [layer.lora_as[slot] for layer in layers]
                    if values[slot] == 0:
                        torch._foreach_zero_(dst)
                        continue
                    torch._foreach_copy_(dst, [layer.lora_a[slot] for layer in layers])
                    # float32 scale, computed in float32 (opmath) and rounded once into A's dtype
                    torch._foreach_mul_(dst, values[slot].item())
        self.stale = False


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
        self.register_buffer("lora_as", torch.zeros_like(self.lora_a), False)  # times the slot's scale
        state.layers.append(self)
        self.k_append = False  # plain base only: see _k_append_pays
        self.next: LoraLinear | None = None  # the layer this one's output feeds (chain)
        self.pad = 0  # zero output rows for next's low-rank input (chain)
        self._given: torch.Tensor | None = None  # the wide input buffer made for this layer
        # (x's data_ptr, its shape, [x | t]) written ahead for this layer's next call (_claim)
        self._ready: tuple[int, tuple, torch.Tensor] | None = None
        # wcat's slot s holds B_s^T at columns in + s*stride + offset ..+rank: stride = rank, offset = 0,
        # unless the layer shares its input with others (share_input: their columns interleave per slot)
        self.stride, self.offset = rank, 0
        self.shared: _SharedInput | None = None
        if isinstance(base, Fp8Linear):
            self.register_buffer(
                "lora_bt", torch.zeros(*shape, self.out_features, dtype=dtype, device=device), False
            )
            self.wcat = None
        else:
            # K-append: [W | B_0 | B_1 | ...] in one buffer; the base weight and the B^T slots are views of
            # it, so one GEMM over [x | t] adds the adapters and W is held once. The pad columns (rows of
            # whole 128-byte lines: _ROW_ALIGN) are never read.
            w = base.weight.detach()
            wcat = torch.zeros(
                self.out_features,
                _aligned(self.in_features + state.slots * rank),
                dtype=w.dtype,
                device=w.device,
            )
            wcat[:, : self.in_features].copy_(w)
            self.register_buffer("wcat", None, False)
            self.register_buffer("lora_bt", None, False)
            self._adopt(wcat)
            self.k_append = _k_append_pays(self.in_features, self.out_features)
            self.bias_cat = None
        self.ncat: torch.Tensor | None = None  # N-append layout (n_append)
        self.bias_n: torch.Tensor | None = None
        self.ranks: dict[str, int] = {}  # adapter name -> its rank on this layer (absent: it leaves it alone)

    def load_slot(self, slot: int, name: str, a: torch.Tensor | None, bt: torch.Tensor | None) -> None:
        """Adapter `name`'s factors into `slot`, in place (fixed addresses: see the module docstring).
        a (rank, in), bt (rank, out) = B^T with its alpha/rank folded in; None: the adapter skips the layer."""
        self.state.stale = True  # the scaled copy of this slot is rewritten by the next LoraState.set
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

    def chain(self, nxt: LoraLinear) -> None:
        """This layer's output (through a GELU at most: GELU(0) = 0) is `nxt`'s input, or the last columns of
        it (mlp.linear_concat's last part): give the weight (and bias) zero rows for nxt's low-rank
        columns, so that this GEMM writes [y | 0] and nxt runs K-append over it without a join (module
        docstring, wide inputs). Plain bases only."""
        if self.wcat is None or nxt.wcat is None or nxt.in_features < self.out_features:
            return
        pad = _aligned(nxt.state.slots * nxt.lora_a.shape[1])
        wcat = torch.zeros(
            self.out_features + pad, self.wcat.shape[1], dtype=self.wcat.dtype, device=self.wcat.device
        )
        wcat[: self.out_features].copy_(self.wcat)
        self._adopt(wcat)
        bias = self.base.bias
        if bias is not None:
            cat = torch.zeros(self.out_features + pad, dtype=bias.dtype, device=bias.device)
            cat[: self.out_features].copy_(bias)
            self.base.bias = nn.Parameter(cat[: self.out_features], requires_grad=False)
            self.bias_cat = cat
        self.next, self.pad = nxt, pad

    def n_append(self) -> None:
        """Switch to the N-append layout (module docstring): [W; scale_0 A_0; ...] in one buffer, so one GEMM
        writes [y | t] reading x once, then y += t B^T. For a plain base wider in than out that a model
        names (lora_n_append: FLUX's single-block output projection, whose 15,360-wide input the
        down-projection would read again); the factors' dtype must be the weight's."""
        if self.wcat is None or self.k_append or self.pad or self.lora_a.dtype != self.wcat.dtype:
            return
        k, out, slots, rank = self.in_features, self.out_features, self.state.slots, self.lora_a.shape[1]
        w = self.base.weight.detach()
        # zero rows up to whole 128-byte output rows: the GEMM writes a contiguous [y | t | 0] whose rows
        # are whole lines, with cuBLASLt's bias epilogue (an addmm into a strided view copies the bias in
        # first: 33 us a call on the H200)
        ncat = torch.zeros(_aligned(out + slots * rank), k, dtype=w.dtype, device=w.device)
        ncat[:out].copy_(w)
        # the B^T slots leave wcat for a buffer of their own, row-major as lora_up reads it (a clone would keep
        # the transposed strides of the wcat view: a copy per call, 38 a FLUX.1-dev forward, H200 profile)
        bt = self.lora_bt.detach().clone(memory_format=torch.contiguous_format)
        self.base.weight = nn.Parameter(ncat[:out], requires_grad=False)
        self.lora_as = ncat[out : out + slots * rank].view(slots, rank, k)  # LoraState.set writes here
        self.lora_bt = bt
        bias = self.base.bias
        if bias is not None:
            self.bias_n = torch.zeros(ncat.shape[0], dtype=bias.dtype, device=bias.device)
            self.bias_n[:out].copy_(bias)
            self.base.bias = nn.Parameter(self.bias_n[:out], requires_grad=False)
        self.wcat, self.ncat = None, ncat
        self.state.stale = True

    def n_rows(self) -> int:
        """Rows of t the N-append GEMM adds (0: not N-append, or no active term)."""
        return self._nslots() * self.lora_a.shape[1] if self.ncat is not None else 0

    def n_weight(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([W; scaled A; 0] and its bias) for GEMMs writing [y | t | 0]: `rows` low-rank rows, then zero
        rows up to a whole 128-byte output row."""
        n = _aligned(self.out_features + rows)
        return self.ncat[:n], None if self.bias_n is None else self.bias_n[:n]

    def n_up(self, y_ext: torch.Tensor, rows: int) -> torch.Tensor:
        """y += t B^T over [y | t | 0] (M, >= out + rows): the N-append layer's output, a view of y_ext."""
        out, rank = self.out_features, self.lora_a.shape[1]
        bt = self.lora_bt[: rows // rank].reshape(rows, out).to(y_ext.dtype)
        return lora_up(y_ext[:, :out], y_ext[:, out : out + rows], bt)

    def _adopt(self, wcat: torch.Tensor) -> None:
        """wcat (rows >= out, in + slots*stride + alignment) becomes the buffer that W and the B^T slots view."""
        k, slots, rank, stride = self.in_features, self.state.slots, self.lora_a.shape[1], self.stride
        self.base.weight = nn.Parameter(wcat[: self.out_features, :k], requires_grad=False)
        self.wcat = wcat
        cols = wcat[: self.out_features, k : k + slots * stride].t().view(slots, stride, -1)
        self.lora_bt = cols[:, self.offset : self.offset + rank]

    def input_buffer(self, like: torch.Tensor) -> torch.Tensor | None:
        """Where a producer may write this layer's next input (shape and dtype of `like`): the left columns
        of a new buffer with room for the active adapters' low-rank columns, when the K-append path will
        run; None when writing elsewhere costs nothing more."""
        nslots = self._nslots()
        if not nslots or self.wcat is None:
            return None
        k = self.in_features
        lead = like.shape[:-1]
        buf = torch.empty(
            like[..., 0].numel(), _aligned(k + nslots * self.stride), dtype=like.dtype, device=like.device
        )
        for layer in self.shared.layers if self.shared else (self,):
            layer._given = buf
        return buf[:, :k].view(*lead, k)

    def _take(self, x: torch.Tensor) -> torch.Tensor | None:
        """The wide buffer (rows, width) whose left columns are x (all of this layer's input, or the last
        part of it: split_terms), if it was made for this layer and has room for the active slots."""
        buf, self._given = self._given, None
        if buf is None or x.data_ptr() != buf.data_ptr():
            return None
        rows = x.reshape(-1, x.shape[-1])
        room = x.shape[-1] + self._nslots() * self.stride
        if rows.shape[0] != buf.shape[0] or rows.stride(0) != buf.stride(0) or buf.shape[1] < room:
            return None
        return buf

    def _give(self, buf: torch.Tensor) -> None:
        self._given = buf

    @property
    def weight(self) -> torch.Tensor:
        # A caller reading the weight would run the base GEMM without the adapters: fail loudly instead.
        raise RuntimeError(
            f"{self.name or 'a LoRA layer'}: call the layer; its weight alone misses the adapters"
        )

    def forward(
        self,
        x: torch.Tensor | Quantized,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        activation: str | None = None,
    ) -> torch.Tensor:
        """activation="gelu": GELU(tanh) of the output, in the GEMM's epilogue where the base is plain."""
        if activation not in (None, "gelu"):
            raise ValueError(f"activation must be None or 'gelu', not {activation!r}")
        if activation is not None and out is not None:
            raise ValueError("activation and out= cannot be combined")
        terms = self._terms()
        if self.ncat is not None and terms and isinstance(x, torch.Tensor) and out is None:
            rows = self.n_rows()
            y = self.n_up(F.linear(x.reshape(-1, self.in_features), *self.n_weight(rows)), rows)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if activation is None else F.gelu(y, approximate="tanh")
        if self.wcat is not None and isinstance(x, torch.Tensor) and x_scale is None:
            ready = self._claim(x)  # [x | t] written ahead (down_ahead)
            wide = ready if ready is not None else self._take(x) if terms else None
            pad = self.pad if out is None and self.next is not None and self.next._nslots() else 0
            # this layer's own terms go into the GEMM's K when that pays or x came wide (else: addmm_ below)
            nslots = self._nslots() if terms and (self.k_append or wide is not None) else 0
            if nslots or pad:
                return self._forward_k_append(x, nslots, wide, out, activation, pad, ready is not None)
            if activation == "gelu" and not terms:  # the base GEMM with its GELU epilogue
                return linear_gelu(x, self.base.weight, self.base.bias)
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

    def _nslots(self) -> int:
        """Slots the K-append path reads: those below the highest active one touching this layer, or any
        layer it shares its input with (0: none). Whole slots (zero rows past an adapter's rank; zero scaled
        A for an inactive slot) keep the shapes a function of state.active alone, as CUDA graphs need."""
        if self.shared:
            return max(_slots_read(layer._terms()) for layer in self.shared.layers)
        return _slots_read(self._terms())

    def _scaled_a(self, nslots: int) -> torch.Tensor:
        """(nslots * stride, in): the scaled A of the first nslots slots, as the down-projection reads it
        (all the sharing layers' rows, interleaved per slot, when the input is shared)."""
        a = self.shared.scaled if self.shared else self.lora_as
        return a[:nslots].reshape(nslots * self.stride, self.in_features)

    def _add_terms(self, x, x_scale, y: torch.Tensor, terms: list[tuple[int, int]]) -> None:
        # One (M, r) product and one up-projection per adapter (lora_up reads and writes all of y again).
        if isinstance(x, Quantized):
            x, x_scale = x
        rows = x.reshape(-1, self.in_features)
        if x_scale is not None:  # the FP8 GEMM's own input: q per row, scale per row (docstring)
            rows = rows.to(self.lora_a.dtype)
        y2 = y.view(-1, self.out_features)
        for slot, r in terms:
            # (M, r), the scale folded in (LoraState.set)
            t = lora_down([rows], self.lora_as[slot, :r].to(rows.dtype), rows.new_empty(rows.shape[0], r))
            if x_scale is not None:
                t = t * x_scale.reshape(-1, 1)
            lora_up(y2, t.to(y2.dtype), self.lora_bt[slot, :r].to(y2.dtype))

    def split_terms(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For mlp.linear_concat's split GEMMs over [part_0 | part_1 | ...] (FLUX's single-block output
        projection, whose 15,360-wide concatenated input is never written): the active adapters' terms
        as (input, weight) of one more accumulating GEMM, or None without adapters. When the last part came
        in a wide buffer made for this layer (chain), t = sum of each part against its columns of A is
        written into that buffer's free columns and the returned pair IS the last part's GEMM, widened
        ([part | t] against [W_part | B]); otherwise the pair is (t, B^T)^T for a separate addmm_."""
        nslots = self._nslots()
        if not nslots or self.ncat is not None:  # N-append: linear_concat writes [y | t] (n_weight)
            return None
        rank, k = self.lora_a.shape[1], self.in_features
        rows = [part.reshape(-1, part.shape[-1]) for part in parts]
        a = self._scaled_a(nslots).to(rows[0].dtype)
        wide = self._take(parts[-1])
        if wide is None:
            t = lora_down(rows, a, rows[0].new_empty(rows[0].shape[0], nslots * rank))
            return t, self.lora_bt[:nslots].reshape(nslots * rank, self.out_features).t()
        last = parts[-1].shape[-1]
        lora_down(rows, a, wide[:, last : last + nslots * rank])
        return wide[:, : last + nslots * rank], self.wcat[: self.out_features, k - last : k + nslots * rank]

    def _forward_k_append(
        self,
        x: torch.Tensor,
        nslots: int,
        wide: torch.Tensor | None,
        out: torch.Tensor | None,
        activation: str | None,
        pad: int,
        filled: bool = False,
    ) -> torch.Tensor:
        """y = [x | t] @ [W | B_0 .. B_{S-1}]^T + b, t = x @ (scale_s A_s)^T per slot s < S: one GEMM. The
        pass computing t writes the join too, unless x came in a wide buffer (input_buffer, chain), or
        `filled`: wide is [x | t] as written ahead (_claim). pad: `pad` more output rows of zeros, the output
        handed on to `next` as its wide input."""
        k, rank = self.in_features, self.lora_a.shape[1]
        # what this layer's GEMM reads: up to its last slot's own columns (wcat has zeros where the layers
        # sharing its input keep theirs, so whatever they hold adds nothing)
        width = k + (nslots - 1) * self.stride + self.offset + rank if nslots else k
        rows = x.reshape(-1, k)
        if not nslots:
            buf = rows
        else:
            if not filled:
                wide, job = self._down_job(x, nslots, wide)
                lora_down([job[0]], *job[1:])
            buf = wide[:, :width]
        rows_out = self.out_features + pad
        weight = self.wcat[:rows_out, :width]
        bias = self.base.bias if not pad or self.base.bias is None else self.bias_cat
        lead = x.shape[:-1]
        if activation == "gelu":
            y = linear_gelu(buf, weight, bias)
        elif out is not None:
            _linear(buf, weight, bias, out)
            return out
        else:
            y = _linear(buf, weight, bias, None)
        if pad:
            self.next._give(y)
            return y[:, : self.out_features].view(*lead, self.out_features)
        return y.view(*lead, self.out_features)

    def _down_job(self, x: torch.Tensor, nslots: int, wide: torch.Tensor | None):
        """(the buffer [x | t] the GEMM reads, the down-projection (x rows, a, out, copy_to) that writes it).
        x came in `wide` (t into its free columns: those of every layer sharing the input, whose calls on x
        then take it as written ahead, `_ready`), or is copied into a new one by the pass that reads it for
        t (the join: kernels/low_rank.py)."""
        k = self.in_features
        rows = x.reshape(-1, k)
        t_end = k + nslots * self.stride  # the columns the down-projection writes
        a = self._scaled_a(nslots).to(rows.dtype)
        if wide is not None:
            for layer in self.shared.layers if self.shared else ():
                if layer is not self:
                    layer._ready = (x.data_ptr(), tuple(x.shape), wide)
            return wide, (rows, a, wide[:, k:t_end], None)
        buf = rows.new_empty(rows.shape[0], _aligned(t_end))
        return buf, (rows, a, buf[:, k:t_end], buf[:, :k])

    def down_ahead(self, x: torch.Tensor):
        """The down-projection this layer's call on x will need, as a job (x, a, out, copy_to) for
        kernels/low_rank.lora_downs, its output kept for that call (which then runs its GEMM alone); None
        when the call will run none (no active term, not K-append, FP8). See downs_together."""
        if self.wcat is None or not isinstance(x, torch.Tensor) or not self._terms():
            return None
        wide = self._take(x)
        if not (self.k_append or wide is not None):
            return None
        buf, job = self._down_job(x, self._nslots(), wide)
        self._ready = (x.data_ptr(), tuple(x.shape), buf)
        return job

    def _claim(self, x: torch.Tensor) -> torch.Tensor | None:
        """The [x | t] buffer written ahead for this x (down_ahead, or a layer sharing the input), if any
        (taken: one call uses it, and the wide buffer given for it with it)."""
        ready, self._ready = self._ready, None
        if ready is None or ready[0] != x.data_ptr() or ready[1] != tuple(x.shape):
            return None
        self._given = None
        return ready[2]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.state.slots}"


def _slots_read(terms: list[tuple[int, int]]) -> int:
    """1 + the highest slot among (slot, rank) terms, 0 for none: the slots a K-append GEMM reads."""
    return 1 + max((slot for slot, _ in terms), default=-1)


# Row alignment of the wide buffers, wcat and ncat, in elements: 128-byte rows (bf16). 16 bytes is all cuBLAS
# needs, but rows of whole 128-byte lines measured faster: a rank-32 FLUX.1-dev forward +4.9% over the base
# instead of +6.0%, an idle adapter +0.0% instead of +0.8% (H200, one A/B call, 2026-12-04).
_ROW_ALIGN = 64


def _aligned(width: int) -> int:
    return width + -width % _ROW_ALIGN


def downs_together(calls: list[tuple[nn.Module, torch.Tensor]]) -> None:
    """The LoRA down-projections of the coming calls (layer, x) run now, two to a launch where the kernel
    allows (kernels/low_rank.lora_downs); each layer's call on that x then runs its GEMM only. Layers that
    are not LoraLinear, or will run no down-projection, are skipped. For calls that are independent of
    each other (FLUX's dual block: the image and text streams' twin layers)."""
    jobs = []
    # a plain loop, not an assignment expression in a comprehension: torch.compile traces this
    for layer, x in calls:
        if isinstance(layer, LoraLinear):
            job = layer.down_ahead(x)
            if job is not None:
                jobs.append(job)
    if jobs:
        lora_downs(jobs)


def input_buffer(layers: list[nn.Module], like: torch.Tensor) -> torch.Tensor | None:
    """Where a producer whose output (shaped like `like`) is all of `layers`' input writes it: the wide
    buffer of the first LoRA layer among them that wants one (LoraLinear.input_buffer; the layers sharing
    its input take it too: share_input), or None (write where you like). Any other layer joins x itself."""
    for layer in layers:
        buf = layer.input_buffer(like) if isinstance(layer, LoraLinear) else None
        if buf is not None:
            return buf
    return None


class _SharedInput:
    """Layers that read one input (share_input): `scaled` (slots, stride, in) holds their scaled A factors,
    each layer's lora_as a view of its rows in every slot, so one down-projection computes all their
    low-rank columns."""

    def __init__(self, layers: list[LoraLinear], scaled: torch.Tensor):
        self.layers, self.scaled = layers, scaled


def share_input(layers: list[LoraLinear]) -> None:
    """Layers that always read the same input (FLUX's single block: the MLP input and q|k|v projections,
    both of h) get one wide buffer [x | slot 0: t_0 t_1 .. | slot 1: ..] and one down-projection: x is
    written once and read once for all their t. Each layer's wcat keeps its B^T slots at its own columns
    of that layout and zeros at the others', and its GEMM reads up to its last active slot's own columns,
    so give the layer with the most output rows first (it reads the fewest zero columns). FLUX.1-dev's
    single block, a rank-32 adapter: one 12.5 us cuBLAS pass (4608x3072x128) where two ran (at 4096 rows
    already 11.4 us for q|k|v's 96 columns, 12.5 for the MLP input's 32), and h written once instead of
    twice (H200, benchmarks/lora_down_rates.py). q|k|v's GEMM reads K = 3200 instead of 3168: 50 k-steps
    of 64 either way.
    Plain K-append layers of one input width only (not N-append, not in a chain); others are left alone."""
    if len(layers) < 2 or any(
        layer.wcat is None or not layer.k_append or layer.pad or layer.shared is not None for layer in layers
    ):
        return
    first = layers[0].lora_a
    if any(layer.lora_a.dtype != first.dtype or layer.in_features != first.shape[2] for layer in layers):
        return
    slots, k = first.shape[0], first.shape[2]
    stride = sum(layer.lora_a.shape[1] for layer in layers)
    scaled = torch.zeros(slots, stride, k, dtype=first.dtype, device=first.device)
    group = _SharedInput(layers, scaled)
    offset = 0
    for layer in layers:
        rank, old = layer.lora_a.shape[1], layer.wcat
        wcat = torch.zeros(old.shape[0], _aligned(k + slots * stride), dtype=old.dtype, device=old.device)
        wcat[:, :k].copy_(old[:, :k])
        bt = layer.lora_bt.clone()
        layer.stride, layer.offset, layer.shared = stride, offset, group
        layer._adopt(wcat)
        layer.lora_bt.copy_(bt)
        layer.lora_as = scaled[:, offset : offset + rank]
        offset += rank
    layers[0].state.stale = True


def _k_append_pays(in_features: int, out_features: int) -> bool:
    """K-append writes x (M x in) once more (the join, in the pass that reads x for t) where the other path
    reads and writes y (M x out) in an up-projection: it pays when in <= out (FLUX's q|k|v, MLP inputs, and
    its square attention output projections: a rank-32 FLUX.1-dev forward +5.3% -> +5.1% over the base with
    those K-append too, H200, one A/B call, 2026-12-04). Wider inputs keep the other path (or N-append)."""
    return in_features <= out_features


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None):
    """F.linear(x, weight, bias), written into `out` when given (rows of their own stride allowed)."""
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
    then call it, as they call a fused FP8 projection. Modules with `lora_chains()` ((producer, consumer)
    submodule names: the producer's output, through a GELU at most, is the consumer's whole input) get
    their pairs of wrapped layers chained (LoraLinear.chain). Returns {called name: LoraLinear}."""
    wrapped = {}
    groups = {(f"{o}.{p}" if o else p): (owner, p, members) for o, owner, p, members in _fused_groups(model)}
    device = state.device
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
    for _, owner in model.named_modules():  # layers the model runs N-append (before chains: no pad then)
        for name in getattr(owner, "lora_n_append", lambda: ())():
            layer = owner.get_submodule(name)
            if isinstance(layer, LoraLinear):
                layer.n_append()
    for _, owner in model.named_modules():  # producer -> consumer pairs the model declares
        for producer, consumer in getattr(owner, "lora_chains", lambda: ())():
            pair = [owner.get_submodule(n) for n in (producer, consumer)]
            if all(isinstance(layer, LoraLinear) for layer in pair):
                pair[0].chain(pair[1])
    fed = {id(layer.next) for layer in wrapped.values() if layer.next is not None}  # chain consumers
    for _, owner in model.named_modules():  # layers of one input the model declares
        for names in getattr(owner, "lora_shared_inputs", lambda: ())():
            group = [
                getattr(owner.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], None) for n in names
            ]
            if all(isinstance(layer, LoraLinear) and id(layer) not in fed for layer in group):
                share_input(group)
    return wrapped
