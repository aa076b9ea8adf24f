"""The kernels that spmm.cu must define (checked by the compile tests and by `flash-llm build --report`)."""

EXPECTED_KERNELS = (
    {f"{fmt}_spmm_{dt}_nt{nt}" for fmt, nts in (("bitmap", (1, 2, 4, 8)), ("tiled_csl", (1, 2, 4)))
     for dt in ("f16", "bf16") for nt in nts}
    | {"bitmap_to_dense", "tiled_csl_to_dense"}
    | {f"splitk_reduce_{a}{dt}_nt{nt}" for a in ("", "silu_") for dt in ("f16", "bf16") for nt in (1, 2, 4)}
    | {f"splitk_reduce_{a}{dt}_nt1" for a in ("rms_", "rms_silu_", "resid_") for dt in ("f16", "bf16")}
    | {f"tiled_csl_spmm_{dt}_{v}" for dt in ("f16", "bf16")
       for v in ("n1", "n1s", "n1r", "n1rs", "nt1a", "nt2a", "w2", "w4", "wg32x2", "wg32x2p3", "wg32x2p3r", "wg32x2p4", "wg32x2p4r",
                 "wg64x2", "wg64x2s2", "wg128x2", "wg128x4", "wg32x2r",
                 "wg64x2r", "wg64x2s2r", "wg128x2r", "wg128x4r")}
    | {f"bitmap_spmm_{dt}_wg{nb}" for dt in ("f16", "bf16") for nb in (8, 16, 32, 64, 128)}
    | {f"decode_attn_{dt}_d{d}{c}" for dt in ("f16", "bf16") for d in (64, 128) for c in ("", "_c32", "_p", "_c32_p")}
    | {"l2_warm_side"}
    | {f"delta_rows_spmm_{dt}_n1" for dt in ("f16", "bf16")} | {"delta_rows_to_dense", "delta_rows_to_dense_nf", "delta_rows_to_dense_nft",
                                                           "delta_rows_to_dense_nftp", "delta_rows_to_dense_pr",
                                                           "delta_rows_to_dense_pr4", "delta_rows_to_dense_sr",
                                                           "delta_rows_to_dense_sr4", "delta_rows_to_dense_srk",
                                                           "delta_rows_to_dense_srk4", "delta_rows_to_dense_srw",
                                                           "delta_rows_to_dense_prw"}
    | {f"delta_rows_{v}_{dt}_nt{nt}" for v in ("spmm", "parts") for dt in ("f16", "bf16") for nt in (2, 4, 8)}
    | {f"delta_rows_spmm_{dt}_nt{nt}a" for dt in ("f16", "bf16") for nt in (2, 4, 8)}
    | {f"delta_rows_reduce_{dt}" for dt in ("f16", "bf16")}
    | {f"delta_rows_parts_{dt}_p{p}_s{st}" for dt in ("f16", "bf16") for p in (2, 4, 8, 16) for st in (1, 2)}
    | {"delta_rows_spmm_bf16_n1c"} | {f"delta_rows_parts_bf16_p{p}_s2c" for p in (2, 4, 8, 16)}
    | {f"delta_rows_spmm_bf16_nt{nt}{a}c" for nt in (2, 4, 8) for a in ("", "a")} | {f"delta_rows_parts_bf16_nt{nt}c" for nt in (2, 4)}
    | {f"delta_rows_spmm_{dt}_mma{nt}" for dt in ("f16", "bf16") for nt in (8, 16, 32)}
    | {f"delta_rows_spmm_{dt}_mma{nt}x" for dt in ("f16", "bf16") for nt in (8, 16)}
    | {f"delta_rows_spmm_bf16_mma{nt}c" for nt in (8, 16, 32)} | {f"delta_rows_spmm_bf16_mma{nt}cx" for nt in (8, 16)}
    | {f"delta_rows_spmm_{dt}_tmma{nt}" for dt in ("f16", "bf16") for nt in (8, 16, 32)}
    | {f"delta_rows_spmm_bf16_tmma{nt}c" for nt in (8, 16, 32)}
)
