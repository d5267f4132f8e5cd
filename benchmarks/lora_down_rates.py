"""The LoRA down-projections of a FLUX.1-dev forward (t = x A^T: M tokens, K inputs, N = slots x rank
columns), each timed alone: cuBLAS in three operand layouts against our Triton kernel (kernels/low_rank.py),
alone and writing the join [x | t] of a K-append input (against the torch.cat the layers used before it).
They are memory-bound (x is read once, N is small), so the figure of merit is x's bytes over the time
against the H200's ~4.8 TB/s.

  x@A^T      cuBLAS, A (N, K) as stored (layers/lora.py: lora_as)
  x@At       cuBLAS, A^T stored (K, N) contiguous
  (A x^T)^T  cuBLAS, the transposed product, N rows by M columns, read back transposed
  ours       kernels/_triton_low_rank.py at its own choice of tile and K split (--sweep: every choice)
  cat join   torch.cat([x, x @ A^T]): the K-append input as the layers built it before our kernel
  ours+join  ours, writing t and the copy of x into one wide buffer

Then the K-append GEMMs themselves (layers/lora.py): FLUX's q|k|v and MLP-input GEMMs with their weight a
view of the wider wcat buffer and K grown by 0, 32, 64, 96 or 128 low-rank columns (the MLP input also with
32 or 64 more output rows, the chained pad), against the plain GEMM: what each width costs, and whether
another alignment of K or N (multiples of 64: whole k-tiles) would cost less.

The down-projections are timed as a graphed forward runs them (CUDA graphs: no launch overhead, which
would otherwise hide a 10 us kernel behind its Python launch), each call on another copy of the inputs, so
x is read from memory, not L2. The K-append GEMMs by triton.testing.do_bench (median; L2 flushed).

    python benchmarks/lora_down_rates.py [--record] [--sweep] [--no-k-append] [--pairs] [--n-append]

--pairs: the dual block's image and text twins, two launches against one (lora_downs), and a sweep of the
paired launch's tiles and split.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

# (label, M, K, N, calls per forward) at 1024^2, one rank-32 adapter in diffusers/PEFT layout (q|k|v fused: 96)
SHAPES = [
    ("dual img q|k|v", 4096, [3072], 96, 19),
    ("dual img out / MLP in", 4096, [3072], 32, 38),
    ("dual img MLP out", 4096, [12288], 32, 19),
    ("dual txt q|k|v", 512, [3072], 96, 19),
    ("dual txt out / MLP in", 512, [3072], 32, 38),
    ("dual txt MLP out", 512, [12288], 32, 19),
    ("single q|k|v + MLP in", 4608, [3072], 128, 38),  # one down-projection for both (share_input)
    ("single out (both parts)", 4608, [3072, 12288], 32, 38),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="append rows to benchmarks/results.jsonl")
    p.add_argument("--sweep", action="store_true", help="also time our kernel at each (block_m, split)")
    p.add_argument("--no-k-append", action="store_true", help="skip the K-append GEMM table")
    p.add_argument("--n-append", action="store_true", help="also the N-append table of the MLP outputs")
    p.add_argument("--pairs", action="store_true", help="also image + text twins in one launch (lora_downs)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_down_rates.py: needs a CUDA GPU")
        return 1
    from triton.testing import do_bench

    from diffserve.kernels._triton_low_rank import lora_down_triton

    bf16 = torch.bfloat16
    impls = ("x@A^T", "x@At", "(A x^T)^T", "ours", "cat join", "ours+join")
    print("| down-projection | M x K x N | per fwd | " + " | ".join(f"{v} us (TB/s)" for v in impls) + " |")
    print("|---|---|---:|" + "---:|" * len(impls))
    totals = [0.0] * len(impls)
    for label, m, ks, n, count in SHAPES:
        k = sum(ks)
        sets = []
        for _ in range(max(2, -(-_L2_DEFEAT // (m * k * 2)))):
            parts = [torch.randn(m, kk, device="cuda", dtype=bf16) for kk in ks]
            a = torch.randn(n, k, device="cuda", dtype=bf16)
            x = parts[0] if len(ks) == 1 else torch.cat(parts, 1)
            wide = torch.empty(m, k + n, device="cuda", dtype=bf16)
            sets.append(dict(parts=parts, a=a, at=a.t().contiguous(), x=x, wide=wide, out=wide[:, k:]))
        fns = [
            lambda d: d["x"] @ d["a"].t(),
            lambda d: d["x"] @ d["at"],
            lambda d: (d["a"] @ d["x"].t()).t(),
            lambda d: lora_down_triton(d["parts"], d["a"], d["out"], None),
        ]
        if len(ks) == 1:  # the join [x | t] of a K-append input: what the layers built before, and ours
            fns += [
                lambda d: torch.cat([d["x"], d["x"] @ d["a"].t()], 1),
                lambda d, k=k: lora_down_triton([d["x"]], d["a"], d["out"], d["wide"][:, :k]),
            ]
        us = [_graph_us(fn, sets) for fn in fns]
        us += [float("nan")] * (len(impls) - len(us))
        for i, u in enumerate(us):
            totals[i] += u * count / 1e3 if u == u else 0.0
        rates = [m * k * 2 / (u * 1e-6) / 1e12 for u in us]
        print(
            f"| {label} | {m}x{k}x{n} | {count} | "
            + " | ".join(f"{u:.1f} ({r:.2f})" for u, r in zip(us, rates, strict=True))
            + " |"
        )
        if args.sweep:
            for join in (False, True) if len(ks) == 1 and n <= 64 else (False,):
                timed = []
                for bm in (16, 32, 64, 128):
                    for split in (1, 2, 3, 4, 6, 8, 12, 16):
                        fn = lambda d, bm=bm, split=split, join=join, k=k: lora_down_triton(  # noqa: E731
                            d["parts"], d["a"], d["out"], d["wide"][:, :k] if join else None,
                            block_m=bm, split=split,
                        )  # fmt: skip
                        try:
                            timed.append((_graph_us(fn, sets), bm, split))
                        except Exception:  # noqa: BLE001 - shared memory exceeded with these tiles: skip
                            continue
                timed.sort()
                print(
                    f"    sweep{' (join)' if join else ''}, fastest (us, block_m, split): "
                    + ", ".join(f"{u:.1f} {bm} {sp}" for u, bm, sp in timed[:5])
                    + f"; the default's: {us[5 if join else 3]:.1f}"
                )
                if not join:
                    best = timed[0]
            if label not in _SWEEP_MORE:
                continue
            _, bm, split = best
            timed = []
            for bk in (64, 128, 256):
                for stages in (2, 3, 4, 5):
                    for warps in (4, 8):
                        kw = dict(block_m=bm, split=split, block_k=bk, num_stages=stages, num_warps=warps)
                        fn = lambda d, kw=kw: lora_down_triton(d["parts"], d["a"], d["out"], None, **kw)  # noqa: E731
                        try:
                            timed.append((_graph_us(fn, sets), bk, stages, warps))
                        except Exception as e:  # shared memory exceeded at this many stages: skip it
                            print(f"    block_k {bk} stages {stages} warps {warps}: {type(e).__name__}")
            timed.sort()
            print(
                f"    at block_m {bm} split {split}, fastest (us, block_k, stages, warps): "
                + ", ".join(f"{u:.1f} {bk} {st} {w}" for u, bk, st, w in timed[:5])
            )
        if args.record:
            for impl, u in zip(impls, us, strict=True):
                if u == u:
                    record(f"lora_down_{label.replace(' ', '_')}_{m}x{k}x{n}", impl, u / 1e3, 2 * m * k * n / (u * 1e-6) / 1e12,
                           tb_per_s=round(m * k * 2 / (u * 1e-6) / 1e12, 3), calls_per_forward=count)  # fmt: skip
    print("ms per forward: " + ", ".join(f"{v} {t:.2f}" for v, t in zip(impls, totals, strict=True)))
    up_projection(args.record)
    if not args.no_k_append:
        k_append(do_bench, args.record)
    if args.pairs:
        pairs(args.record)
    if args.n_append:
        n_append(args.record)
    return 0


_SWEEP_MORE = ("dual img q|k|v", "dual img out / MLP in", "dual img MLP out")  # --sweep: stages, warps too
_L2_DEFEAT = 160 << 20  # bytes of inputs cycled through per timing: over the H200's 50 MB L2 three times


def _graph_us(fn, sets) -> float:
    """us per call of fn(d), timed as in a CUDA-graphed forward (no launch overhead), each call on the next
    of `sets` (inputs as if just written by another kernel, not cached in L2)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(lambda: [fn(d) for d in sets], return_mode="median") * 1e3 / len(sets)


# (label, M, K, N, GELU epilogue, calls per forward)
GEMMS = [
    ("dual img q|k|v", 4096, 3072, 9216, False, 19),
    ("dual img MLP in", 4096, 3072, 12288, True, 19),
    ("single q|k|v", 4608, 3072, 9216, False, 38),
    ("single MLP in", 4608, 3072, 12288, True, 38),
]


def k_append(do_bench, record_rows: bool) -> None:
    from diffserve.kernels.fused_ops import linear_gelu

    bf16 = torch.bfloat16
    extras = (0, 32, 64, 96, 128)
    print("\nK-append GEMMs: us (% over K + 0), the weight a view of a buffer 256 columns wider, as wcat")
    print("| GEMM | M x K x N | " + " | ".join(f"K+{e}" for e in extras) + " | N+32 (K+32) | N+64 (K+32) |")
    print("|---|---|" + "---:|" * (len(extras) + 2))
    for label, m, k, n, gelu, _count in GEMMS:
        wide = torch.randn(n + 64, k + 256, device="cuda", dtype=bf16) * k**-0.5
        bias = torch.randn(n + 64, device="cuda", dtype=bf16)
        # the input as the layers build it: rows exactly as wide as the GEMM's K (a cat, or a wide buffer)
        xs = {kk: torch.randn(m, kk, device="cuda", dtype=bf16) for kk in {k + e for e in extras}}

        def gemm(kk: int, nn: int, xs=xs, wide=wide, bias=bias, gelu=gelu):
            w, b = wide[:nn, :kk], bias[:nn]
            return linear_gelu(xs[kk], w, b) if gelu else torch.nn.functional.linear(xs[kk], w, b)

        cases = [(k + e, n) for e in extras] + [(k + 32, n + 32), (k + 32, n + 64)]
        us = [do_bench(lambda kk=kk, nn=nn: gemm(kk, nn), return_mode="median") * 1e3 for kk, nn in cases]
        print(
            f"| {label} | {m}x{k}x{n} | "
            + " | ".join(f"{u:.1f} ({100 * (u / us[0] - 1):+.1f}%)" for u in us)
            + " |"
        )
        if record_rows:
            for (kk, nn), u in zip(cases, us, strict=True):
                record(f"lora_k_append_{label.replace(' ', '_')}_{m}x{k}x{n}", f"K={kk} N={nn}", u / 1e3,
                       2 * m * kk * nn / (u * 1e-6) / 1e12, over_k0=round(u / us[0] - 1, 4))  # fmt: skip


# FLUX.1-dev's dual block: (label, image rows, text rows, K, the join, pairs per forward), rank 32
PAIRS = [
    ("to_out joins", 4096, 512, 3072, True, 19),
    ("MLP inputs", 4096, 512, 3072, False, 19),
    ("MLP outputs", 4096, 512, 12288, False, 19),
]


def pairs(record_rows: bool) -> None:
    """The image and text streams' twin down-projections: two launches of our kernel against one
    (kernels/low_rank.lora_downs) at its own choice of tiles and split, and the fastest choices of a sweep;
    graphed."""
    from diffserve.kernels._triton_low_rank import lora_down_triton

    bf16, n = torch.bfloat16, 32
    print("image + text down-projections, rank 32: us, graphed\n| pair | M x K | two launches | one launch |")
    print("|---|---|---:|---:|")
    for label, m_img, m_txt, k, join, count in PAIRS:
        sets = []
        for _ in range(max(2, -(-_L2_DEFEAT // ((m_img + m_txt) * k * 2)))):
            jobs = []
            for m in (m_img, m_txt):
                x = torch.randn(m, k, device="cuda", dtype=bf16)
                wide = torch.empty(m, k + n, device="cuda", dtype=bf16)
                a = torch.randn(n, k, device="cuda", dtype=bf16)
                jobs.append((x, a, wide[:, k:], wide[:, :k] if join else None))
            sets.append(jobs)
        two = _graph_us(lambda d: [lora_down_triton([j[0]], *j[1:]) for j in d], sets)
        one = _graph_us(lambda d: lora_down_triton([d[0][0]], *d[0][1:], pair=d[1]), sets)
        print(f"| {label} | ({m_img} + {m_txt}) x {k} | {two:.1f} | {one:.1f} |")
        timed = []
        for bm in (16, 32, 64):
            for split in (1, 2, 3, 4, 6, 8):

                def fn(d, bm=bm, split=split):
                    lora_down_triton([d[0][0]], *d[0][1:], pair=d[1], block_m=bm, split=split)

                timed.append((_graph_us(fn, sets), bm, split))
        timed.sort()
        print(
            "    sweep, fastest (us, block_m, split): "
            + ", ".join(f"{u:.1f} {b} {sp}" for u, b, sp in timed[:5])
        )
        if record_rows:
            for impl, u in (("two launches", two), ("one launch", one)):
                record(f"lora_down_pair_{label.replace(' ', '_')}_{m_img}+{m_txt}x{k}x{n}", impl, u / 1e3,
                       calls_per_forward=count)  # fmt: skip


def up_projection(record_rows: bool) -> None:
    """y += t B^T onto a layer's output (rank 32): cuBLAS's addmm_ against our pass (kernels/low_rank.py
    lora_up), y contiguous (the attention output projections) and a view with 3,136-wide rows (N-append's
    [y | t | 0])."""
    from diffserve.kernels._triton_low_rank import lora_up_triton

    bf16 = torch.bfloat16
    print("\nup-projections y += t B^T, rank 32: us (TB/s of y read and written), graphed")
    print("| output | M x N | addmm_ | ours |")
    print("|---|---|---:|---:|")
    for label, m, n, width in (
        ("dual img to_out", 4096, 3072, 3072),
        ("single out, N-append", 4608, 3072, 3136),
    ):
        sets = []
        for _ in range(3):
            buf = torch.randn(m, width, device="cuda", dtype=bf16)
            sets.append(dict(y=buf[:, :n], t=torch.randn(m, 32, device="cuda", dtype=bf16),
                             bt=torch.randn(32, n, device="cuda", dtype=bf16) * 0.01))  # fmt: skip
        us = [
            _graph_us(lambda d: d["y"].addmm_(d["t"], d["bt"]), sets),
            _graph_us(lambda d: lora_up_triton(d["y"], d["t"], d["bt"]), sets),
        ]
        rates = [2 * m * n * 2 / (u * 1e-6) / 1e12 for u in us]
        print(
            f"| {label} | {m}x{n} | "
            + " | ".join(f"{u:.1f} ({r:.2f})" for u, r in zip(us, rates, strict=True))
            + " |"
        )
        if record_rows:
            for impl, u, r in zip(("addmm_", "ours"), us, rates, strict=True):
                record(
                    f"lora_up_{label.replace(' ', '_').replace(',', '')}_{m}x{n}",
                    impl,
                    u / 1e3,
                    None,
                    tb_per_s=round(r, 3),
                )


def n_append(record_rows: bool) -> None:
    """The MLP output projections (in 12,288 or 3,072 + 12,288 > out 3,072), rank-32 adapter, three ways:
    base (no adapter); as the layers run them now (our down-projection of the GELU output, then the
    K-append GEMM over [g | t]); N-append (A's rows appended to W's: one GEMM writes [y | t], reading g once,
    then y += t B^T, an addmm_ over y)."""
    print("\nMLP output projections with a rank-32 adapter: us (% over base), graphed, inputs beyond L2")
    print("| projection | M x K x N | base | K-append now | N-append + addmm_ |")
    print("|---|---|---:|---:|---:|")
    for label, m, ks in (("dual MLP out", 4096, [12288]), ("single out", 4608, [3072, 12288])):
        us = _n_append_case(m, ks)
        k, n = sum(ks), 3072
        print(
            f"| {label} | {m}x{k}x{n} | {us[0]:.1f} | "
            + " | ".join(f"{u:.1f} ({100 * (u / us[0] - 1):+.1f}%)" for u in us[1:])
            + " |"
        )
        if record_rows:
            for impl, u in zip(("base", "K-append now", "N-append + addmm_"), us, strict=True):
                record(f"lora_n_append_{label.replace(' ', '_')}_{m}x{k}x{n}", impl, u / 1e3, 2 * m * k * n / (u * 1e-6) / 1e12,
                       over_base=round(u / us[0] - 1, 4))  # fmt: skip


def _n_append_case(m: int, ks: list[int], n: int = 3072, rank: int = 32) -> list[float]:
    from diffserve.kernels._triton_low_rank import lora_down_triton

    bf16, dev, linear = torch.bfloat16, "cuda", torch.nn.functional.linear
    k, kl = sum(ks), ks[-1]
    w = torch.randn(n, k, device=dev, dtype=bf16) * k**-0.5
    b = torch.randn(n, device=dev, dtype=bf16)
    a = torch.randn(rank, k, device=dev, dtype=bf16) * k**-0.5
    bt = torch.randn(rank, n, device=dev, dtype=bf16) * 0.01
    wcat = torch.zeros(n, kl + rank + 8, device=dev, dtype=bf16)  # the last part's [W | B] (K-append)
    wcat[:, :kl] = w[:, k - kl :]
    wcat[:, kl : kl + rank] = bt.t()
    wn = torch.cat([w, a])  # N-append: [W; A]
    bn = torch.cat([b, torch.zeros(rank, device=dev, dtype=bf16)])
    sets = []
    for _ in range(2):
        parts = [torch.randn(m, kk, device=dev, dtype=bf16) for kk in ks[:-1]]
        wide = torch.randn(m, kl + rank + 8, device=dev, dtype=bf16)  # [g | t | pad], as chained
        parts.append(wide[:, :kl])
        sets.append(dict(parts=parts, wide=wide))

    def split_gemms(ps, weight, bias):
        out, col = None, 0
        for part in ps:
            wp = weight[:, col : col + part.shape[1]]
            col += part.shape[1]
            out = linear(part, wp, bias) if out is None else out.addmm_(part, wp.t())
        return out

    def now(d):
        ps = d["parts"]
        lora_down_triton(ps, a, d["wide"][:, kl : kl + rank], None)
        last = d["wide"][:, : kl + rank]
        if len(ps) == 1:
            return linear(last, wcat[:, : kl + rank], b)
        return linear(ps[0], w[:, : ks[0]], b).addmm_(last, wcat[:, : kl + rank].t())

    def nap(d):
        out = split_gemms(d["parts"], wn, bn)
        return out[:, :n].addmm_(out[:, n:], bt)

    return [_graph_us(fn, sets) for fn in (lambda d: split_gemms(d["parts"], w, b), now, nap)]


if __name__ == "__main__":
    sys.exit(main())
