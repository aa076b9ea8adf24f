"""The delta-rows prototype against Tiled-CSL's N = 1 kernel and cuBLAS, on Llama-3-8B's layers (one GPU).

    python benchmarks/proto_delta/bench.py [--sparsities 80,70] [--dtypes fp16] [--out DIR]

For every (layer, sparsity): cuBLAS (``F.linear`` on the dense weight, N = 1), ``flash_llm.spmm`` with the
weight in Tiled-CSL (the fused ``_n1r`` kernel), and the prototype at several split counts and prefetch depths:
the output is poisoned, checked against an fp32 product (tolerance from PyTorch's own fp16/bf16 error) and
against the format's reference sum; then timed (CUDA-graph replays over copies rotated beyond 3x L2, CUDA events,
median).  Prints a table; writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _timing as T  # noqa: E402
import delta_rows as D  # noqa: E402

import flash_llm  # noqa: E402

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def split_candidates(slices: int, sms: int, per_sm: list[int]) -> list[int]:
    """Split counts giving about ``per_sm`` one-warp blocks per SM."""
    return sorted({max(1, round(b * sms / slices)) for b in per_sm})


def variants(text: str) -> list[tuple[int, int]]:
    """"2x24,4x32" -> [(pf, minb), ...]"""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def clone(enc: D.DeltaRows) -> D.DeltaRows:
    return D.DeltaRows(enc.shape, enc.dtype, enc.splits, enc.data.clone(), enc.off.clone(), enc.starts.clone(),
                       enc.win.clone(), enc.perm.clone(), enc.nnz, enc.max_window)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="80,70")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--variants", default="2x24,4x24,8x24,2x32,4x32", help="prefetch x blocks-per-SM bound")
    ap.add_argument("--per-sm", default="12,24,32,48,64,96", help="blocks per SM the split counts aim at")
    ap.add_argument("--chain", action="store_true", help="then time the four layers one after another")
    ap.add_argument("--out", default="benchmarks/out/proto_delta")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = T.environment()
    env["copy_bw_GBs"] = T.copy_bandwidth() / 1e9
    env["command"] = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    print(json.dumps(env), flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for layer in args.layers.split(","):
            m, k = LAYERS[layer]
            x = torch.randn(k, device="cuda", dtype=dtype, generator=gen)
            x2 = x[None, :]
            dense = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            copies = [dense] + [dense.clone() for _ in range(T.copies_needed(dense.nbytes) - 1)]
            t_dense = T.time_calls([lambda w=w: torch.nn.functional.linear(x2, w) for w in copies])
            del copies, dense
            for sp in [int(v) / 100 for v in args.sparsities.split(",")]:
                wd = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                wd.mul_(torch.rand(m, k, device="cuda", generator=gen) >= sp)
                ref = wd.float() @ x.float()
                err_torch = (torch.nn.functional.linear(x2, wd)[0].float() - ref).abs().max().item()
                tol = 2 * err_torch + 1e-3
                tc = flash_llm.TiledCSL.from_dense(wd)
                y_tc = flash_llm.spmm(x2, tc)[0]
                err_tc = (y_tc.float() - ref).abs().max().item()
                tcs = [tc] + [type(tc)._from_parts({n: t.clone() for n, t in tc.tensors().items()}, tc.shape, tc.dtype,
                                                   tc.nnz) for _ in range(T.copies_needed(tc.nbytes) - 1)]
                t_tc = T.time_calls([lambda c=c: flash_llm.spmm(x2, c) for c in tcs])
                del tcs
                base = dict(layer=layer, M=m, K=k, sparsity=sp, dtype=dname, t_dense_us=t_dense * 1e6,
                            t_tcsl_us=t_tc * 1e6, tcsl_bytes=tc.nbytes, err_torch=err_torch, err_tcsl=err_tc)
                print(f"{layer:8s} {m}x{k} sp={sp:.2f} {dname}: dense {t_dense * 1e6:7.1f} us, Tiled-CSL "
                      f"{t_tc * 1e6:7.1f} us (x{t_dense / t_tc:4.2f}, {tc.nbytes / m / k:.3f} B/elem), "
                      f"err torch {err_torch:.2e} tcsl {err_tc:.2e}", flush=True)
                del tc
                slices = -(-m // 32)
                for s in split_candidates(slices, sms, [int(v) for v in args.per_sm.split(",")]):
                    enc = D.encode(wd, s)
                    sc = D.Scratch(enc, "cuda")
                    yref = D.matvec_reference(enc, x)
                    encs = [enc] + [clone(enc) for _ in range(T.copies_needed(enc.nbytes) - 1)]
                    for pf, minb in variants(args.variants):
                        out = torch.full((m,), float("nan"), device="cuda", dtype=dtype)
                        D.launch(enc, x, sc, out, pf=pf, minb=minb)
                        torch.cuda.synchronize()
                        err = (out.float() - ref).abs().max().item()
                        err_fmt = (out.float() - yref).abs().max().item()
                        ok = bool(torch.isfinite(out).all()) and err <= tol
                        t = T.time_calls([lambda e=e, sc=sc, pf=pf, mb=minb: D.launch(e, x, sc, out, pf=pf, minb=mb)
                                          for e in encs])
                        row = dict(base, splits=s, pf=pf, minb=minb, blocks=slices * s, bytes=enc.nbytes,
                                   B_per_elem=enc.nbytes / m / k, max_window=enc.max_window,
                                   mean_window=float(enc.win[..., 1].float().mean()), t_us=t * 1e6,
                                   vs_dense=t_dense / t, vs_tcsl=t_tc / t, err=err, err_fmt=err_fmt, ok=ok,
                                   GBs=enc.nbytes / t / 1e9, pct_copy=100 * enc.nbytes / t / env["copy_bw_GBs"] / 1e9)
                        rows.append(row)
                        print(f"   delta S={s:3d} pf={pf} b{minb} blocks={slices * s:5d} {row['B_per_elem']:.3f} B/elem "
                              f"win {row['max_window']:5d}: {t * 1e6:7.1f} us  x{row['vs_dense']:4.2f} dense  "
                              f"x{row['vs_tcsl']:4.2f} tcsl  {row['pct_copy']:3.0f}% copy  err {err:.2e} "
                              f"(fmt {err_fmt:.2e}) {'ok' if ok else 'WRONG'}", flush=True)
                    del encs, enc, sc
                del wd
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    print("\nbest per (layer, sparsity, dtype):")
    best = {}
    for r in rows:
        key = (r["layer"], r["sparsity"], r["dtype"])
        if r["ok"] and (key not in best or r["t_us"] < best[key]["t_us"]):
            best[key] = r
    print("| layer | sparsity | dtype | dense us | Tiled-CSL us | delta us (S, pf x minb) | vs dense | vs Tiled-CSL | % copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (layer, sp, dn), r in best.items():
        print(f"| {layer} | {sp:.0%} | {dn} | {r['t_dense_us']:.1f} | {r['t_tcsl_us']:.1f} | {r['t_us']:.1f} "
              f"({r['splits']}, {r['pf']}x{r['minb']}) | {r['vs_dense']:.2f} | {r['vs_tcsl']:.2f} | {r['pct_copy']:.0f} |")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(bad)} wrong results" if bad else "all results within tolerance")
    if args.chain:
        chains = chain(args, best, gen, env)
        with open(os.path.join(args.out, "chain.json"), "w") as f:
            json.dump(chains, f, indent=1)


def chain(args, best, gen, env) -> list[dict]:
    """The four layers launched one after another (one decoder layer's projections at N = 1), each with its best
    configuration from the sweep: cuBLAS, Tiled-CSL through flash_llm.spmm (plain, and programmatic under
    static_weights as the engine runs it) and delta rows (plain and programmatic)."""
    from flash_llm import kernels

    out_rows = []
    layers = args.layers.split(",")
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for sp in [int(v) / 100 for v in args.sparsities.split(",")]:
            if not all((layer, sp, dname) in best for layer in layers):
                continue
            sets = []  # one entry per copy: [(x, dense, tcsl, enc, scratch, out, cfg), ...] over the layers
            per_copy = 0
            parts = []
            for layer in layers:
                m, k = LAYERS[layer]
                r = best[(layer, sp, dname)]
                wd = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                wd.mul_(torch.rand(m, k, device="cuda", generator=gen) >= sp)
                x = torch.randn(k, device="cuda", dtype=dtype, generator=gen)
                enc = D.encode(wd, r["splits"])
                tc = flash_llm.TiledCSL.from_dense(wd)
                parts.append((x, wd, tc, enc, r))
                per_copy += wd.nbytes
            copies = T.copies_needed(per_copy)
            for c in range(copies):
                row = []
                for x, wd, tc, enc, r in parts:
                    if c:
                        wd, tc, enc = wd.clone(), type(tc)._from_parts({n: t.clone() for n, t in tc.tensors().items()},
                                                                        tc.shape, tc.dtype, tc.nnz), clone(enc)
                    row.append((x, wd, tc, enc, D.Scratch(enc, "cuda"), torch.empty(wd.shape[0], device="cuda",
                                                                                    dtype=dtype), r))
                sets.append(row)

            def dense_calls(sets):
                return [lambda row=row: [torch.nn.functional.linear(x[None], wd) for x, wd, *_ in row] for row in sets]

            def tcsl_calls(sets):
                return [lambda row=row: [flash_llm.spmm(x[None], tc) for x, _, tc, *_ in row] for row in sets]

            def delta_calls(sets, pdl):
                return [lambda row=row: [D.launch(enc, x, sc, o, pf=r["pf"], minb=r["minb"], pdl=pdl)
                                         for x, _, _, enc, sc, o, r in row] for row in sets]

            t_dense = T.time_calls(dense_calls(sets))
            t_tc = T.time_calls(tcsl_calls(sets))
            with kernels.static_weights():
                t_tc_pdl = T.time_calls(tcsl_calls(sets))
            t_d = T.time_calls(delta_calls(sets, False))
            t_d_pdl = T.time_calls(delta_calls(sets, True))
            res = dict(sparsity=sp, dtype=dname, layers=layers, dense_us=t_dense * 1e6, tcsl_us=t_tc * 1e6,
                       tcsl_pdl_us=t_tc_pdl * 1e6, delta_us=t_d * 1e6, delta_pdl_us=t_d_pdl * 1e6)
            out_rows.append(res)
            print(f"chain {'+'.join(layers)} sp={sp:.2f} {dname}: dense {t_dense * 1e6:.1f} us | Tiled-CSL "
                  f"{t_tc * 1e6:.1f} (x{t_dense / t_tc:.2f}), programmatic {t_tc_pdl * 1e6:.1f} "
                  f"(x{t_dense / t_tc_pdl:.2f}) | delta {t_d * 1e6:.1f} (x{t_dense / t_d:.2f}), programmatic "
                  f"{t_d_pdl * 1e6:.1f} (x{t_dense / t_d_pdl:.2f})", flush=True)
            del sets, parts
    return out_rows


if __name__ == "__main__":
    main()
