"""FP8 linear layers for `--quantization fp8` (issue 17): e4m3 weights with per-output-channel scales,
e4m3 activations with per-token dynamic scales, one torch._scaled_mm (row-wise scaling) per GEMM.

  Fp8Linear.from_linear(linear)          an nn.Linear's weight quantised once, at construction
  Fp8Linear(...)(x)                      quantise x per row (kernels/fp8_quant.py), then the FP8 GEMM
  Fp8Linear(...)(xq, x_scale=s)          the GEMM alone, for a caller whose fused kernel already wrote
                                         (xq, s): fp8_quant.adaln_quant / modulate_quant / gelu_quant
  Fp8Linear(...)(Quantized(xq, s))       the same, the pair as the block passes below return it
  quantize_linears(model, include)       the selected nn.Linear layers of a model replaced in place
  dit_linears(name, linear)              the default selection for our FLUX and Wan DiTs
  norm_modulate_quant, residual_norm_modulate_quant, gelu_quant, concat_gelu_quant
                                         the blocks' passes that write a GEMM input, writing it quantised
                                         (one pass on CUDA): what models/flux.py, models/wan.py and
                                         layers/mlp.py call where every GEMM reading that input is FP8

How the models use it: a block asks fp8_layers(consumers...) and, where all the GEMMs that read an input
are Fp8Linear, computes that input with the *_quant form of its pass and hands the Quantized to them (FLUX's
q|k|v and MLP inputs, Wan's q|k|v, cross-attention q and FFN inputs, the GELU outputs, FLUX's single-block
[attention | MLP]). Attention outputs have no such pass (the attention kernel writes them): their output
projections quantise their input themselves (Fp8Linear(x)). No call site reads `.weight` of an Fp8Linear
(tests/unit/test_fp8_models.py checks weight_reads == 0 through whole generations).

The same code runs on the CPU: torch._scaled_mm has a CPU implementation (torch 2.13), so CI tests the path
the GPU serves. What each device accepts (checked by probing torch 2.13 on the CPU; CUDA's rules from
aten/src/ATen/native/cuda/ScaledBlas.cpp):
  - row-wise scaling on both: scale_a (M, 1) and scale_b (1, N), float32, contiguous; (M,)/(N,) shapes,
    bf16 scales or mixing a row-wise with a tensor-wise scale are refused ("Invalid scaling configuration").
    Operands are 2-D: leading batch dims are flattened here.
  - CUDA (sm90): the second operand column-major (a (N, K) row-major weight, transposed: weight.t()), the
    first row-major; K and N multiples of 16 (M free); bias only with a bf16/fp16 output, of that dtype (not
    with a float32 output). use_fast_accum=True skips Hopper's periodic promotion of the FP8 accumulators
    (faster; torchao's default for forward GEMMs).
  - CPU (torch 2.13): any layout and size, output float32, bf16, fp16 or fp8, a bias of any float dtype with
    any output; use_fast_accum is ignored. It dequantises both operands to float32, runs a float32 GEMM
    (relative error ~2e-7 against float64) and rounds once to the output dtype. Older torch CPU builds (2.11)
    take tensor-wise scales only: there Fp8Linear computes the same thing in torch ops.
So the weight is stored (N, K) row-major and handed over as the (K, N) column-major view .t() (no copy per
call), and the bias is fused into _scaled_mm wherever the device takes it (else added after).

Numerics: e4m3 has 3 mantissa bits: each operand element is off by at most 2^-4 relative (half a step),
so a GEMM's output is typically ~3-4% off in relative Frobenius norm on random data (tests/unit/test_fp8.py
holds it to a worst-case bound per element), against ~0.3% for bf16.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from diffserve.kernels import fp8_quant
from diffserve.kernels.fp8_quant import FP8_DTYPE, quantize_activation, quantize_with_scale, scale_from_amax

logger = logging.getLogger(__name__)

_warned_weight_read = False


class Quantized(NamedTuple):
    """An activation quantised per token, as the fused kernels write it: q (batch, seq, K) float8_e4m3fn and
    scale (batch, seq, 1) float32 (x ~ q * scale). Fp8Linear takes it in place of a tensor."""

    q: torch.Tensor
    scale: torch.Tensor

    def tokens(self, start: int) -> Quantized:
        """The tokens (dim 1) from `start` on: a per-token scale slices with its rows."""
        return self if not start else Quantized(self.q[:, start:], self.scale[:, start:])


def fp8_layers(*layers: nn.Module) -> bool:
    """Whether every one of `layers` is an Fp8Linear: then their shared input is worth writing quantised (by
    the kernel that computes it, once) instead of in bf16. If only some are, the input stays bf16 and each
    Fp8Linear quantises it itself (right, one pass slower): a custom selection may split a block that way."""
    # takes_quantized: a LoRA layer over a bf16 base (layers/lora.py) is called like an Fp8Linear but must
    # get its input unquantised
    return all(isinstance(layer, Fp8Linear) and layer.takes_quantized for layer in layers)


# ---------------------------------------------------------------- fused producers of GEMM inputs
# The blocks' modulated-LayerNorm passes (layers/modulation.py) with their output written quantised: what a
# block calls instead when the GEMMs reading that output are FP8 (fp8_layers). One pass on CUDA
# (kernels/fp8_quant.py); on the CPU and under torch.compile the reference (adaln, then the quantisation).


def norm_modulate_quant(x, shift, scale, eps: float = 1e-6, upcast: bool = False) -> Quantized:
    """modulation.norm_modulate, quantised."""
    return Quantized(*fp8_quant.modulate_quant(x, shift, scale, eps, upcast))


def residual_norm_modulate_quant(
    x, y, gate, shift, scale, eps: float = 1e-6, upcast: bool = False, affine: bool = False
) -> tuple[torch.Tensor, Quantized]:
    """modulation.residual_norm_modulate: (x', h) with h quantised."""
    x_out, q, s = fp8_quant.adaln_quant(x, shift, scale, eps, upcast, residual=y, gate=gate, affine=affine)
    return x_out, Quantized(q, s)


def gelu_quant(y: torch.Tensor) -> Quantized:
    """GELU(tanh)(y), quantised: the hidden layer of an MLP whose output projection is FP8."""
    return Quantized(*fp8_quant.gelu_quant(y))


def concat_gelu_quant(plain: torch.Tensor, pre_gelu: torch.Tensor) -> Quantized:
    """[plain | GELU(tanh)(pre_gelu)] quantised with one scale per token over the whole row: FLUX's single
    blocks' [attention | MLP] input of the output projection, never concatenated in bf16."""
    return Quantized(*fp8_quant.concat_gelu_quant(plain, pre_gelu))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wq, scale) of a (N, K) weight: per output channel (row) scale = amax over the inputs / 448, float32
    (1, N) — the layout _scaled_mm's scale_b takes; wq (N, K) float8_e4m3fn, row-major."""
    scale = scale_from_amax(weight.detach().abs().amax(dim=1, keepdim=True))  # (N, 1)
    return quantize_with_scale(weight.detach(), scale).contiguous(), scale.reshape(1, -1).contiguous()


def fp8_gemm_supported(in_features: int, out_features: int, device: torch.device | str) -> str | None:
    """None if _scaled_mm takes a (out_features, in_features) weight on `device`, else why not."""
    if torch.device(device).type == "cuda" and (in_features % 16 or out_features % 16):
        return f"CUDA FP8 GEMMs need in and out features that are multiples of 16, got {in_features} -> {out_features}"
    return None


@functools.cache
def cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU torch._scaled_mm takes row-wise scales (2.13 does; 2.11's oneDNN path
    asserts on anything but tensor-wise scales)."""
    a, b = torch.ones(2, 16).to(FP8_DTYPE), torch.ones(16, 16).to(FP8_DTYPE)
    try:  # two rows and 16 columns: one scale each would read as tensor-wise
        torch._scaled_mm(
            a, b.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except RuntimeError:
        return False
    return True


def _scaled_mm_cpu_emulated(a, b, scale_a, scale_b, bias, out_dtype) -> torch.Tensor:
    """What torch 2.13's CPU _scaled_mm computes (operands dequantised to float32, a float32 GEMM with the
    bias, one rounding to out_dtype), for a torch whose CPU implementation lacks row-wise scales."""
    out = (a.float() * scale_a) @ (b.float() * scale_b)
    return (out if bias is None else out + bias.float()).to(out_dtype)


class Fp8Linear(nn.Module):
    """y = x @ W^T + b with W in float8_e4m3fn (per-output-channel scales) and x quantised per row.

    Buffers: `qweight` (out, in) float8_e4m3fn, `weight_scale` (1, out) float32; `bias` (out,) stays in the
    layer's original dtype (a frozen Parameter, as nn.Linear's). Build it once the model is on its device
    and dtype and never call .to(dtype) after: a dtype cast would convert the FP8 weight and the float32
    scales too (they are floating point to torch).

    forward(x): x (..., in) in any float dtype; out (..., out) in x.dtype.
    forward(xq, x_scale=s): xq (..., in) float8_e4m3fn and s (..., 1) float32 as fp8_quant's functions return
    them (s = the row's amax / 448; x ~ xq * s); out in `out_dtype` (default: the layer's original dtype).
    This is the hook for fused kernels: the kernel that writes the GEMM's input (adaLN modulation, GELU)
    quantises it in the same pass, and the layer only runs the GEMM.

    `.weight` still answers, with the weight dequantised to the original dtype (a full-size temporary per
    read), so that code reading the weight directly keeps working; such code does not get the FP8 GEMM.
    `weight_reads` counts those reads: a wired model should leave it at 0.
    """

    takes_quantized = True  # fp8_layers: its input may arrive quantised (False for a LoRA over bf16)

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        use_fast_accum: bool = True,
    ):
        super().__init__()
        if qweight.dtype != FP8_DTYPE or qweight.dim() != 2 or qweight.stride(1) != 1:
            raise ValueError(f"qweight must be a row-major (out, in) {FP8_DTYPE} matrix")
        out_features, in_features = qweight.shape
        if weight_scale.shape != (1, out_features) or weight_scale.dtype != torch.float32:
            raise ValueError(
                f"weight_scale must be (1, {out_features}) float32, got {tuple(weight_scale.shape)}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.dtype = dtype  # the original weight's dtype: what .weight and pre-quantised calls return
        self.use_fast_accum = use_fast_accum
        self.weight_reads = 0
        self.name = ""  # set by quantize_linears, for messages

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, use_fast_accum: bool = True
    ) -> Fp8Linear:
        qweight, scale = quantize_weight(weight)
        return cls(qweight, scale, bias, weight.dtype, use_fast_accum)

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_fast_accum: bool = True) -> Fp8Linear:
        """The layer with linear's weight quantised (the float weight is not kept)."""
        return cls.from_weight(linear.weight, linear.bias, use_fast_accum)

    def rows(self, start: int, stop: int) -> Fp8Linear:
        """The layer of output channels start..stop-1, sharing this layer's tensors (no copy): per-channel
        scales make a slice of a quantised fused weight the quantised slice."""
        bias = None if self.bias is None else self.bias[start:stop]
        return Fp8Linear(
            self.qweight[start:stop], self.weight_scale[:, start:stop], bias, self.dtype, self.use_fast_accum
        )

    @property
    def weight(self) -> torch.Tensor:
        global _warned_weight_read
        if torch.compiler.is_compiling():  # a Python counter in traced code would force recompiles
            return (self.qweight.to(torch.float32) * self.weight_scale.t()).to(self.dtype)
        self.weight_reads += 1
        if not _warned_weight_read:
            _warned_weight_read = True
            logger.warning(
                "fp8: the weight of %s was read directly and dequantised: that call site runs a %s GEMM, "
                "not the FP8 one (call the layer instead)", self.name or "an Fp8Linear", self.dtype,
            )  # fmt: skip
        return (self.qweight.to(torch.float32) * self.weight_scale.t()).to(self.dtype)

    def forward(
        self,
        x: torch.Tensor | Quantized,
        x_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out: write the result into this (..., out_features) tensor of out_dtype (rows of a larger buffer,
        e.g. FLUX's joint q|k|v buffer; its rows must be contiguous) and return it."""
        if isinstance(x, Quantized):
            x, x_scale = x
        if x_scale is None:
            if x.dtype == FP8_DTYPE:
                raise ValueError("Fp8Linear: an FP8 input needs its row scales (x_scale)")
            out_dtype = out_dtype or x.dtype
            xq, x_scale = quantize_activation(x)
        else:
            if x.dtype != FP8_DTYPE:
                raise ValueError(f"Fp8Linear: x_scale goes with a {FP8_DTYPE} input, got {x.dtype}")
            xq, out_dtype = x, out_dtype or self.dtype
        lead = xq.shape[:-1]
        a = xq.reshape(-1, self.in_features)
        scale_a = x_scale.reshape(-1, 1)
        if scale_a.dtype != torch.float32 or scale_a.shape[0] != a.shape[0]:
            raise ValueError(
                f"x_scale must be float32 with one scale per row ({a.shape[0]}), got {tuple(x_scale.shape)}"
            )
        if out is None:
            return self._mm(a, scale_a.contiguous(), out_dtype).reshape(*lead, self.out_features)
        if out.dtype != out_dtype:
            raise ValueError(f"Fp8Linear: out is {out.dtype}, the output is {out_dtype}")
        self._mm(a, scale_a.contiguous(), out_dtype, out.view(-1, self.out_features))
        return out

    def _mm(
        self, a: torch.Tensor, scale_a: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The GEMM: (M, out) = (a * scale_a) @ (qweight * weight_scale)^T + bias in out_dtype (into `out`
        when given). a (M, in) float8_e4m3fn row-major, scale_a (M, 1) float32 contiguous."""
        bias = self.bias
        fuse_bias = bias is not None and (
            not a.is_cuda or (out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype)
        )
        if not a.is_cuda and not cpu_rowwise_scaled_mm():
            result = _scaled_mm_cpu_emulated(a, self.qweight.t(), scale_a, self.weight_scale, bias, out_dtype)
            return result if out is None else out.copy_(result)
        kwargs = {} if out is None else {"out": out}
        result = torch._scaled_mm(
            a,
            self.qweight.t(),  # (in, out) column-major: the layout cuBLASLt's FP8 GEMM takes on sm90
            scale_a=scale_a,
            scale_b=self.weight_scale,
            bias=bias if fuse_bias else None,
            out_dtype=out_dtype,
            use_fast_accum=self.use_fast_accum and a.is_cuda,
            **kwargs,
        )
        if bias is not None and not fuse_bias:
            result = result.add_(bias.to(out_dtype))
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={self.dtype}, use_fast_accum={self.use_fast_accum}"
        )


# ---------------------------------------------------------------- which layers: our DiTs


# The repeated blocks' image-token GEMMs, by name relative to the DiT (diffusers' names, kept by ours).
# A fused projection (fuse_linears: `qkv`, `kv`, ...) is selected through its members' names, so the same
# names hold before and after fuse_projections().
_DIT_LINEARS = re.compile(
    r"(?:^|\.)(?:"
    # FLUX dual-stream blocks: the image stream only. The text stream's `add_*` projections, `to_add_out`
    # and `ff_context` (and Wan's cross-attention k|v below) run GEMMs over the 512 text tokens, which FP8
    # does not speed up: measured on an H200 (issue 17; bench_fp8.py --with-text), 512-row FP8 GEMMs ran
    # at 179-564 TFLOP/s, no faster than bf16, against 1,100-1,240 for the 4,096-row image GEMMs (540-690
    # in bf16). Quantising them would only add their activation-quantisation passes and e4m3's error.
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))"
    # FLUX single-stream blocks: the joint sequence's q|k|v, MLP in and the output projection
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out)"
    # Qwen-Image blocks: the image stream as FLUX's (attn.to_q|to_k|to_v|to_out.0 match the FLUX pattern
    # above; its MLP is img_mlp); the text stream (add_*, to_add_out, txt_mlp) stays bf16, as FLUX's
    r"|transformer_blocks\.\d+\.img_mlp\.net\.(?:0\.proj|2)"
    # Wan blocks: self-attention q|k|v and out, cross-attention q (video tokens) and out, the FFN; not the
    # cross-attention k|v, which project the 512 text tokens
    r"|blocks\.\d+\.(?:attn1\.(?:to_q|to_k|to_v|to_out\.0)|attn2\.(?:to_q|to_out\.0)|ffn\.net\.(?:0\.proj|2))"
    r")$"
)


def dit_linears(name: str, linear: nn.Linear) -> bool:
    """The default selection for FLUX.1, Wan2.x and Qwen-Image DiTs: the big image/video-token GEMMs of the repeated
    blocks. Names, relative to the DiT (i = block index):

    FLUX dual-stream  transformer_blocks.i.attn.to_q|to_k|to_v (fused: attn.qkv), attn.to_out.0,
                      ff.net.0.proj, ff.net.2                                      — 4 GEMMs a block
    FLUX single       single_transformer_blocks.i.attn.to_q|to_k|to_v (fused: attn.qkv), proj_mlp, proj_out
                                                                                   — 3 GEMMs a block
    Qwen-Image        transformer_blocks.i.attn.to_q|to_k|to_v (attn.qkv), attn.to_out.0, img_mlp.net.0.proj,
                      img_mlp.net.2                                                — 4 GEMMs a block
    Wan               blocks.i.attn1.to_q|to_k|to_v (fused: attn1.qkv), attn1.to_out.0, attn2.to_q,
                      attn2.to_out.0, ffn.net.0.proj, ffn.net.2                    — 6 GEMMs a block
    Left in bf16: the embedders (x_embedder, context_embedder, time_text_embed.*, condition_embedder.*,
    patch_embedding), every adaLN projection (norm1.linear, norm1_context.linear, norm.linear, norm_out.linear,
    time_proj; FLUX fuses them into one GEMV), the final proj_out, and the text-token GEMMs: FLUX's
    attn.add_q_proj|add_k_proj|add_v_proj (add_qkv), attn.to_add_out, ff_context.*, Wan's attn2.to_k|to_v (kv).
    """
    return _DIT_LINEARS.search(name) is not None


# ---------------------------------------------------------------- replacing layers in place


def _fused_groups(model: nn.Module) -> list[tuple[str, nn.Module, str, list[tuple[str, nn.Linear]]]]:
    """Every projection fused by models.base.fuse_linears: (owner name, owner, fused prefix, [(member
    name, member)] in row order). fuse_linears keeps `<prefix>_weight`/`<prefix>_bias` buffers on the owner
    and makes each member's weight a view of rows of that buffer; the members are found by that sharing."""
    by_storage: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            by_storage.setdefault(module.weight.untyped_storage().data_ptr(), []).append((name, module))
    groups = []
    for owner_name, owner in model.named_modules():
        for buf_name, buf in owner.named_buffers(recurse=False):
            if not buf_name.endswith("_weight") or buf is None or buf.dim() != 2 or buf.device.type == "meta":
                continue
            members = by_storage.get(buf.untyped_storage().data_ptr(), [])
            if not members:
                continue
            members = sorted(members, key=lambda m: m[1].weight.storage_offset())
            rows = sum(m.weight.shape[0] for _, m in members)
            tiles = rows == buf.shape[0] and members[0][1].weight.storage_offset() == buf.storage_offset()
            if not tiles or any(m.in_features != buf.shape[1] for _, m in members):
                raise ValueError(f"{owner_name}.{buf_name}: its member layers do not tile the fused weight")
            groups.append((owner_name, owner, buf_name.removesuffix("_weight"), members))
    return groups


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _weight_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quantize_linears(
    model: nn.Module,
    include: Callable[[str, nn.Linear], bool] = dit_linears,
    use_fast_accum: bool = True,
) -> dict:
    """Replace the nn.Linear layers of `model` that include(name, layer) selects by Fp8Linear, in place.

    Call it once the model is on its device and dtype and its projections are fused (loader.load_dit).
    A fused projection (fuse_linears) is one GEMM: it is quantised when `include` selects every one of its
    members (a partial selection is an error) and becomes an Fp8Linear registered on its owner under the
    fused prefix (e.g. `attn.qkv` for `attn.qkv_weight`), whose rows the members become (views, no copy); the
    owner's bf16 `<prefix>_weight`/`<prefix>_bias` buffers are set to None, which frees them and sends the
    models back to the members (one FP8 GEMM each) until they call the fused layer. Per-channel scales make
    the two agree exactly: quantising the fused weight is quantising each member's rows.

    On CUDA, layers whose shapes _scaled_mm refuses (not multiples of 16) stay as they are ("skipped").
    Returns stats: count (GEMMs now FP8: a fused group counts once), layers (nn.Linear layers replaced),
    names (the GEMMs, fused ones under their fused name), bytes_before / bytes_after (the replaced weights:
    original dtype vs FP8 plus the float32 scales; biases unchanged, not counted), skipped {name: why}.
    """
    stats = {"count": 0, "layers": 0, "names": [], "bytes_before": 0, "bytes_after": 0, "skipped": {}}
    grouped: set[int] = set()

    def account(name: str, before: torch.Tensor, layer: Fp8Linear, members: int) -> None:
        layer.name = name
        stats["count"] += 1
        stats["layers"] += members
        stats["names"].append(name)
        stats["bytes_before"] += _weight_bytes(before)
        stats["bytes_after"] += _weight_bytes(layer.qweight) + _weight_bytes(layer.weight_scale)

    for owner_name, owner, prefix, members in _fused_groups(model):
        grouped.update(id(m) for _, m in members)
        chosen = [include(name, m) for name, m in members]
        if not any(chosen):
            continue
        fused_name = f"{owner_name}.{prefix}" if owner_name else prefix
        if not all(chosen):
            picked = [name for (name, _), c in zip(members, chosen, strict=True) if c]
            raise ValueError(
                f"{picked} are fused with the other rows of {fused_name} into one GEMM: select all of "
                f"{[name for name, _ in members]} or none"
            )
        weight, bias = getattr(owner, f"{prefix}_weight"), getattr(owner, f"{prefix}_bias", None)
        why = fp8_gemm_supported(weight.shape[1], weight.shape[0], weight.device)
        if why:
            stats["skipped"][fused_name] = why
            continue
        if hasattr(owner, prefix):
            raise ValueError(f"{fused_name}: the owner already has an attribute {prefix!r}")
        fused = Fp8Linear.from_weight(weight, bias, use_fast_accum)
        owner.add_module(prefix, fused)
        row = 0
        for name, member in members:
            rows = member.weight.shape[0]
            part = fused.rows(row, row + rows)
            part.name = name
            _set_submodule(model, name, part)
            row += rows
        setattr(owner, f"{prefix}_weight", None)
        if hasattr(owner, f"{prefix}_bias"):
            setattr(owner, f"{prefix}_bias", None)
        account(fused_name, weight, fused, len(members))

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or id(module) in grouped or not include(name, module):
            continue
        why = fp8_gemm_supported(module.in_features, module.out_features, module.weight.device)
        if why:
            stats["skipped"][name] = why
            continue
        layer = Fp8Linear.from_linear(module, use_fast_accum)
        _set_submodule(model, name, layer)
        account(name, module.weight, layer, 1)
    return stats
