"""CUDA implementation of ``flash_llm::spmm``: launch configuration, split-K choice and dispatch.

Everything host-side is plain Python; the kernels (``spmm.cu``) only see pointers and sizes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import numbers
import os
import sys
import threading
import types
import warnings
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..formats._layout import STRIP_K, STRIP_M, ceil_div
from ..reference import apply_norm, silu_mul_halves
from .._env import env_choice as _env_choice, env_flag as _env_flag, env_float as _env_float, \
    env_int as _env_int
from ._build import KernelBuildError, blocks_per_sm, compile_kernels, launch, sm90, static_shared  # noqa: F401


WARPS = 4
THREADS = 32 * WARPS
ROWS_PER_BLOCK = WARPS * STRIP_M  # 64 output features per block, for both formats
BITMAP, TILED_CSL, DELTA_ROWS = 0, 1, 2  # reference.FORMAT_IDS
_FORMAT_PREFIX = {BITMAP: "bitmap", TILED_CSL: "tiled_csl", DELTA_ROWS: "delta_rows"}

P = ctypes.c_void_p
I = ctypes.c_int


def supported(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA kernels can run on ``device`` (and why not): a GPU of compute capability 8.0 or more,
    cuda-python, and an NVRTC library it can load (loaded at the first call; a failure is remembered, so later calls
    cost nothing: :func:`._build.nvrtc_problem`)."""
    if device.type != "cuda":
        return False, f"device {device} is not a CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, (f"GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                       "the tensor-core kernels need 8.0 or newer")
    try:
        import cuda.bindings  # noqa: F401
    except ImportError:
        return False, "cuda-python is not installed (pip install cuda-bindings nvidia-cuda-nvrtc)"
    from . import _build

    why = _build.nvrtc_problem()
    if why is not None:
        return False, why
    return True, ""


@dataclass(frozen=True)
class LaunchPlan:
    nt: int  # 8-token tiles per warp (1, 2, 4 or 8)
    n_chunks: int  # blocks along N
    row_blocks: int  # blocks along M
    splits: int  # blocks along K
    kt_per_split: int
    block_tokens: int  # tokens per block: 8 nt, or 64 / 128 for the Tiled-CSL kernels of N > 32
    block_rows: int  # weight rows per block: 64, or 128 for the warpgroup Tiled-CSL kernel


_SM_COUNT: dict[int, int] = {}


def sm_count(device_index: int) -> int:
    n = _SM_COUNT.get(device_index)
    if n is None:
        n = _SM_COUNT[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return n


#: Shared memory one block may have, static and dynamic together (CUDA's ``MaxSharedMemoryPerBlockOptin``), by compute
#: capability, where PyTorch's device properties do not say (``shared_memory_per_block_optin``): 163 KiB on sm_80 /
#: sm_87, 99 KiB on sm_86 / sm_89 / sm_120, 227 KiB on sm_90 / sm_100; SHARED_OPTIN_MIN for any other.
SHARED_OPTIN_BY_CC = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                      (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}
SHARED_OPTIN_MIN = 99 * 1024
_SHARED_OPTIN: dict[int, int] = {}


def shared_optin(device_index: int) -> int:
    """The most shared memory (bytes, static and dynamic together) one block may have on the device:
    ``torch.cuda.get_device_properties(...).shared_memory_per_block_optin``, else :data:`SHARED_OPTIN_BY_CC`."""
    n = _SHARED_OPTIN.get(device_index)
    if n is None:
        props = torch.cuda.get_device_properties(device_index)
        n = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
        if n <= 0:
            n = SHARED_OPTIN_BY_CC.get((props.major, props.minor), SHARED_OPTIN_MIN)
        _SHARED_OPTIN[device_index] = n
    return n


def dynamic_shared_limit(device: torch.device, name: str) -> int | None:
    """The most dynamic shared memory kernel ``name`` may ask for on ``device``: :func:`shared_optin` less its static
    shared memory (:func:`._build.static_shared`; a launch asking more fails).  None off a CUDA device (the host side
    run on the CPU, as the tests do): the planners that take it (:func:`parts_nt_window`, :func:`parts_stage`,
    :func:`parts_n1_fits`, :func:`dr_nt_norm_ok`) then cap nothing beyond their own constants."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return shared_optin(index) - static_shared(index, name)


# 8-token tiles per block at most: the one-warp Tiled-CSL kernel holds 64 rows x NT tiles of accumulators, so it
# covers N > 32 with several blocks of 32 tokens (on the H200, N = 64 at 80 %: 1.37x faster than a 64-token block)
_MAX_NT = {BITMAP: 8, TILED_CSL: 4}


def reduce_ways(tiles: int, nt: int, sms: int) -> int:
    """Warps that share each 32 partial-sum groups in the Tiled-CSL split-K reduction (``splitk_reduce_*``):
    4 when its launch at one thread per group (``tiles x nt`` blocks of 128 threads) would not give every SM
    two blocks, else 1.  H200: 4096 x 14336 at N = 1 (64 tiles) 28 -> 22 us with 4; 9216 x 36864 at N = 32
    (576 block columns) 101 us with 1, 105 with 4."""
    return 4 if tiles * nt < 2 * sms else 1


#: the warpgroup Tiled-CSL kernel (N > 64 on sm_90): tokens per block and warpgroups (64 weight rows each) per block.
#: H200, session 8, 9216 x 36864 at 80 %: N = 128 in 284 us with 2 warpgroups, 278 with 4; 64 tokens per block
#: ran N = 64 in 245 us, slower than two warps of the multi-warp kernel (200 us).
WG_TOKENS, WG_ROWS = 128, 2


#: The Tiled-CSL warpgroup kernel with 32 tokens per block (``_wg32x2``) runs N = TCSL_WG32_MIN_N .. 32 at weight
#: densities from TCSL_WG32_MIN_DENSITY up, in place of the one-warp ``_nt4``.  H200, 9216 x 36864, N = 32 (session 9,
#: benchmarks/RESULTS.md): 411 -> 276 us at 50 % sparsity, 247 -> 197 at 70 %, 170 -> 162 at 80 %, but 104 -> 154 at
#: 90 % (its entry loads are one tile ahead for 8 warpgroups per SM: latency-bound when the tiles are short).
TCSL_WG32_MIN_N = _env_int("FLASH_LLM_TCSL_WG32_MIN_N", 17, 0)
TCSL_WG32_MIN_DENSITY = _env_float("FLASH_LLM_TCSL_WG32_MIN_DENSITY", 0.17, 0.0, 1.0)
#: N = 17-32 at weight densities from this up run ``_wg32x2p3``: ``_wg32x2`` with three rounds of entries a warp
#: prefetched a tile ahead (37.5 % density) instead of two (25 %), so that a 70 % tile's last round is not a load waited
#: on at once by two of the four warps while the others wait at the block barrier.  Below it the third round would
#: hold only pads.  H200, session 38 (``benchmarks/results/2026-12-02-s38/callC-D``, ``bench_e2e.py``, ms per token):
#: Llama-3-8B at 70 %, batch 32, 5.337 -> 5.063 and, on another card, 5.363 -> 5.098 (1.02x -> 1.07x of dense); with
#: the third round at every density, 80 % went 4.751 -> 4.795.  The same for ``_wg64x2s2`` gained nothing (batch 64
#: 6.719 -> 6.744).  ``FLASH_LLM_TCSL_WG32_PF3_MIN_DENSITY`` overrides it.
TCSL_WG32_PF3_MIN_DENSITY = _env_float("FLASH_LLM_TCSL_WG32_PF3_MIN_DENSITY", 0.25, 0.0, 1.0)
#: And ``_wg32x2p4`` (four rounds, 50 % density) from this density up: a 60 % tile holds about 410 units, past three
#: rounds' 384.  H200, session 39, Llama-3-8B batch 32 end to end: 60 % 5.795 -> 5.386 ms per token (0.93x -> 1.00x of
#: dense), 50 % 6.421 -> 6.094.  ``FLASH_LLM_TCSL_WG32_PF4_MIN_DENSITY`` overrides it.
TCSL_WG32_PF4_MIN_DENSITY = _env_float("FLASH_LLM_TCSL_WG32_PF4_MIN_DENSITY", 0.375, 0.0, 1.0)
#: From that density up ``_wg32x2p4`` runs from N = TCSL_WG32_DENSE_MIN_N (not TCSL_WG32_MIN_N) on, in place of
#: ``_nt2``: one decode of a tile per 128 rows, read by the tensor cores, against one per 64 rows read back by ldmatrix.
#: H200, session 40 (``benchmarks/results/2026-12-02-s40/callD-G``, ``bench_e2e.py``, ms per token, dense-end setting
#: against the old 17): Llama-3-8B 60 % batch 12 / 16 +16 % / 5.766 -> 4.921 (0.88x -> 1.03x of dense); OPT-30B 60 %
#: batch 16 20.576 -> 18.666 (0.88x -> 0.97x).  At 70 % (``_wg32x2p3``) mixed: Llama-3-8B batch 16 4.807 / 4.803 ->
#: 4.594 / 4.599 (two rounds), OPT-30B 16.347 -> 16.697; at 80 % (``_wg32x2``) it lost (Llama-3-8B batch 16 3.99-4.00 ->
#: 4.27, batch 8 3.60 -> 4.14).  ``FLASH_LLM_TCSL_WG32_DENSE_MIN_N`` overrides it.
TCSL_WG32_DENSE_MIN_N = _env_int("FLASH_LLM_TCSL_WG32_DENSE_MIN_N", 9, 0)
#: Between the two (``_wg32x2p3``'s densities, 70 % sparsity) the warpgroup kernel runs N = 9-16 on weights of at most
#: this many elements (M x K).  H200, session 41 (``benchmarks/results/2026-12-02-s41/callD-E``, ``splits_sweep.py
#: --pdl``, N = 12 and 16 at 70 %, us at the plan's splits, ``_wg32x2p3`` against ``_nt2``): Llama-3-8B q/k/v (25 M
#: elements) 15.8 / 20.3, o (17 M) 12.3 / 15.7, down (59 M) 30.8 / 33.6, merged gate / up (117 M) 58.0 / 59.4; OPT-30B o
#: (51 M) 28.6 / 30.4, but q/k/v (154 M) 73.4 / 72.5, fc1 and fc2 (205 M) 95.5 / 92.6 and 97.4 / 94.6.
#: End to end (``callF``, ``bench_e2e.py``, ms per token at batch 12 / 16, one round): Llama-3-8B 4.723 / 4.801 ->
#: 4.550 / 4.597 (1.04x -> 1.08x / 1.09x of dense), OPT-30B 16.598 / 16.562 -> 16.614 / 16.488.
#: ``FLASH_LLM_TCSL_WG32_MID_MAX_ELEMENTS`` overrides it (0: never).
TCSL_WG32_MID_MAX_ELEMENTS = _env_int("FLASH_LLM_TCSL_WG32_MID_MAX_ELEMENTS", 1 << 27, 0)
#: N = 33-64 on sm_90 at weight densities from this up run ``_wg64x2s2`` (two pipeline stages, 4 blocks an SM of 49 KiB
#: in 64 registers), below it ``_wg64x2`` (three stages, 3 blocks of 73 KiB): a denser tile keeps its block longer per
#: tile, and a fourth block an SM hides more of that latency than a third stage does.  H200, session 37, Llama-3-8B
#: (``bench_e2e.py``, one run each, ms per token): at 70 % sparsity batch 48 / 64 6.438 / 6.888 -> 6.250 / 6.711 and
#: OPT-30B batch 64 27.51 -> 26.87; at 80 % the two-stage kernel lost (Llama-3-8B batch 64 6.110 -> 6.188-6.205, OPT-30B
#: 24.15 -> 24.70).  ``FLASH_LLM_TCSL_WG64_S2_MIN_DENSITY`` overrides it (a Tiled-CSL weight's density counts its pads:
#: 0.2004 at 80 % sparsity, 0.3004 at 70 %).
TCSL_WG64_S2_MIN_DENSITY = _env_float("FLASH_LLM_TCSL_WG64_S2_MIN_DENSITY", 0.25, 0.0, 1.0)
#: N = 1 on the CUDA cores (``tiled_csl_spmm_<dtype>_n1``: no dense tile, no MMA); ``FLASH_LLM_TCSL_N1=0`` for nt1.
#: H200, session 14: 9216 x 36864 at 80 % 93-98 -> 80-81 us, at 90 % 70 -> 49-53 us
TCSL_N1 = _env_flag("FLASH_LLM_TCSL_N1", True)
#: The ``_n1`` kernel's split-K summed in the same launch (``_n1r`` / ``_n1rs``: the last block of each row group sums
#: the splits and applies the norm / SiLU / residual epilogue), not by a ``splitk_reduce_*`` launch after it;
#: ``FLASH_LLM_N1_FUSED=0`` for the two launches.
N1_FUSED = _env_flag("FLASH_LLM_N1_FUSED", True)
#: The fused N = 1 kernels' tiles shared evenly among the splits (split ``s`` of ``S`` takes tiles ``s K_t / S`` to
#: ``(s + 1) K_t / S``) instead of ``ceil(K_t / S)`` each and the rest to the last (Llama-3-8B gate / up, 64 tiles in 7
#: splits: six of 10 and one of 4, where an SM holding more 10-tile blocks ends later); ``FLASH_LLM_N1_EVEN=0`` for the
#: ceil split.  H200, Llama-3-8B at 80 %, batch 1, ms per token: session 24 2.884 -> 2.866, session 25 (two rounds)
#: 2.942 / 2.937 -> 2.905 / 2.906.
N1_EVEN = _env_flag("FLASH_LLM_N1_EVEN", True)
#: The warpgroup kernels' split-K summed in the same launch (``_wg<NB>x<R>r``: every block of a row group, once all
#: the group's partial sums are stored, sums its share of them; see :func:`_wg_spread_ok` for when), not by a
#: ``splitk_reduce_*`` launch after it; ``FLASH_LLM_WG_SPREAD=0`` for the two launches.
WG_SPREAD = _env_flag("FLASH_LLM_WG_SPREAD", True)
#: The one-warp MMA kernels up to ``NT_ATOMIC`` x 8 tokens sum their split-K by fp32 atomics into zeroed sums, and the
#: last block of each row group writes Y (``_nt<NT>a``), not a ``splitk_reduce_*`` launch after them: ``1`` (the
#: default) for ``_nt1`` (N = 2-8), ``2`` for ``_nt2`` (N = 9-16) too, ``FLASH_LLM_NT_ATOMIC=0`` for none.  The sums'
#: order is then the atomics', so a result's last bits may change from launch to launch (within rounding of the
#: deterministic reduction's).  H200, session 48, Llama-3-8B (``bench_e2e.py``, ms per token, reduction -> atomics):
#: at every split count, 80 % batch 8 3.579 / 3.582 -> 3.455 / 3.458 (two rounds), batch 4 3.553 -> 3.436, 70 % batch
#: 4 / 8 4.337 / 4.406 -> 4.194 / 4.264, but OPT-30B at 80 % batch 8 11.495 -> 11.641 and ``_nt2a`` at batch 16 3.966 /
#: 3.973 -> 4.231 / 4.232; from NT_ATOMIC_MIN_SPLITS splits, Llama-3-8B batch 8 3.568 -> 3.450, OPT-30B 11.500 ->
#: 11.463, and ``_nt2a`` at batch 16 still 3.968 / 3.984 -> 4.093 / 4.093: so ``_nt2`` keeps its reduction (H100,
#: session 68, Llama-3-8B bf16 at 80 %, batch 16: 4.318 / 4.317 -> 4.541 / 4.535).
NT_ATOMIC = _env_int("FLASH_LLM_NT_ATOMIC", 1, 0, 2)
#: ... and only from this many splits (``FLASH_LLM_NT_ATOMIC_MIN_SPLITS``): the reduction reads every split's partial
#: tile, so it costs more the more splits there are, while few splits on many row blocks ran faster with it (H200,
#: session 48, ``splits_sweep.py --pdl`` at N = 8, 80 %, us at the plan's splits, reduction / atomics: 6144 x 4096 (22
#: splits) 14.5 / 12.8, 4096 x 4096 (32) 11.7 / 10.5, 4096 x 14336 (38) 23.4 / 22.2, 7168 x 7168 (23) 23.4 / 20.0,
#: 7168 x 28672 (23) 63.8 / 62.7, 28672 x 4096 (5) 41.7 / 41.1, 21504 x 7168 (7) 51.0 / 52.1, 28672 x 7168 (11)
#: 65.9 / 66.8).
NT_ATOMIC_MIN_SPLITS = _env_int("FLASH_LLM_NT_ATOMIC_MIN_SPLITS", 16, 0)
#: DeltaRows' multi-token kernels (2-8 tokens, the split layout) sum their splits by fp32 atomics, the last warp of each
#: slice writing Y (``delta_rows_spmm_<dtype>_nt<NT>a``), not ``delta_rows_reduce_<dtype>`` after them;
#: ``FLASH_LLM_DR_NT_ATOMIC=0`` for the reduction (bit for bit repeatable).
DR_NT_ATOMIC = _env_flag("FLASH_LLM_DR_NT_ATOMIC", True)
#: ... on weights of at least this many splits (``FLASH_LLM_DR_NT_ATOMIC_MIN_SPLITS``).  Session 49 (H200, 80 %, ms per
#: token at batch 2 / 3, DeltaRows engines): every split count from 2: Llama-3-8B 2.821 / 3.293, from 17: 2.816 / 3.185
#: (its gate / up, 4 splits, back on the reduction); OPT-30B (q/k/v 5 splits, fc1 4, out and fc2 16) with the
#: reduction everywhere 7.674 / 10.317, atomics everywhere 7.854 / 10.360, from 16 7.766 / 10.276, from 17 (none)
#: 7.687 / 10.307.  Alone (``dr_parts_tokens.py --atomics``) the atomics are within 0.4 us of the reduction on the
#: 4-5-split layers and 2-3 us faster on Llama-3-8B's 19-28-split q/k/v, o and down.
DR_NT_ATOMIC_MIN_SPLITS = _env_int("FLASH_LLM_DR_NT_ATOMIC_MIN_SPLITS", 17, 0)
#: RMSNorm inside DeltaRows' 2-token kernel of the parts layout (``delta_rows_parts_<dtype>_nt2``: each token's sum of
#: squares and X times the norm's weight while staging, as the N = 1 kernel does), and with it the Llama engine's
#: one-token path (norms and residual adds inside the projections) for decode steps of 2 sequences.  On by default
#: (``FLASH_LLM_DR_NT_NORM=0`` turns it off).  H200, session 57 (Llama-3-8B bf16, 80 %, coded DeltaRows, batch 2, ms a
#: token, two rounds of one call): without it 2.651 / 2.650; with it 2.610 / 2.608 when the norm kernels are launched
#: after their predecessor has finished (no programmatic launch, as here), 2.705 / 2.705 when they are launched
#: programmatically: then their blocks wait resident through the o projection and down, which slow by 2-3 us each
#: (``profile_decode.py``), more than the two norm launches a layer cost.
DR_NT_NORM = _env_flag("FLASH_LLM_DR_NT_NORM", True)
#: The fewest 64-column tiles per split the plan gives the ``_n1`` kernel (``_nt1`` / ``_nt2``: NT_MIN_TILES; the
#: others: 4); ``FLASH_LLM_N1_MIN_TILES`` overrides it (session 14's split sweep chose 2: Llama-3-8B o and q/k/v at
#: N = 1 on 32 splits)
N1_MIN_TILES = _env_int("FLASH_LLM_N1_MIN_TILES", 2, 1)
#: The same for the one-warp MMA kernels ``_nt1`` and ``_nt2`` (N = 2-16; ``_nt4`` and the warpgroup kernels keep 4);
#: ``FLASH_LLM_NT_MIN_TILES`` overrides it.  Session 21's split sweep launched as the engine does (one H200,
#: ``tests/data/splits_h200_s21_pdl.json``): Llama-3-8B q/k/v and o at N = 8 / 16 ran 11.9 / 16.3 and 10.8 / 13.1 us at
#: 22 and 32 splits, against 16.2 / 18.4 and 14.7 / 17.5 at the 16 that 4 tiles allowed.
NT_MIN_TILES = _env_int("FLASH_LLM_NT_MIN_TILES", 2, 1)

#: The split-K model of the Tiled-CSL warpgroup kernels (:func:`plan`): a lone block on an SM takes this share of a
#: full SM's round of ``blocks_per_sm`` blocks, and the partial sums weigh WG_WS_WEIGHT of their bytes against the
#: weight's.  Fitted on H200 (session 10, ``benchmarks/splits_sweep.py``, Llama-3-8B's four layers at 80 %,
#: N = 32 / 64, every split count 1-16): the chosen split's time was 1.00-1.03x the best (mean 1.006), where the
#: slot model of the other kernels gave up to 1.12x (mean 1.041): merged gate/up at N = 32 70.7 -> 63.2 us.
#: ``FLASH_LLM_WG_LATENCY_SHARE`` overrides the share.  Session 20: 0.55, fitted on a sweep of plain launches, ran
#: Llama-3-8B's decode 5-8 % slower at batch 32 / 64; swept as the engine launches the spmm (programmatically,
#: ``splits_sweep.py --pdl``), 0.8 picks the fastest count on 7 of those 8 layers (``tests/test_plan.py``).
#: Session 36: both grow with the weight's density, to WG_LATENCY_SHARE_DENSE and WG_WS_WEIGHT_DENSE from density
#: 0.29 (linearly from 0.21: a Tiled-CSL weight's density counts its pads, 0.2004 at 80 % sparsity, 0.3004 at 70 %):
#: a denser tile's scatter keeps a lone block as busy as a full round.  The sweeps at 70 % sparsity, launched as the
#: engine does (``tests/data/splits_h200_s36_pdl_70.json``, ``..._70_opt.json``), have Llama-3-8B's merged gate / up at
#: N = 64 in 86.1 / 95.8 / 89.3 us at 3 / 4 / 5 splits (seven blocks an SM at 4: rounds of 3, 3 and a lone 1) where
#: 80 % ran 71.1 / 71.8 / 71.7.  The session-20 model picked 4 there, 1.11x the fastest, and 1.13x on OPT-30B's o at
#: N = 32; with 0.9 and 0.75 it picks the fastest count on 15 of the 16 layers and N, 1.022x on the last (any weight
#: of 0.5-1.0 stays within 1.022x), and every 80 % choice as before.  End to end, Llama-3-8B at 70 %, batch 64 (H200,
#: ``benchmarks/RESULTS.md``): 7.17-7.20 ms per token with 4 splits for gate / up, 7.03 with 5, 6.89 with 3 (what this
#: model takes).  ``FLASH_LLM_WG_LATENCY_SHARE`` sets one share for all densities and the weight at WG_WS_WEIGHT.
WG_LATENCY_SHARE_DENSE = 0.9
WG_WS_WEIGHT_DENSE = 0.75
_WG_SHARE = _env_float("FLASH_LLM_WG_LATENCY_SHARE", None, 0.0, 1.0,  # (None: unset, or not valid)
                       means="the shares by density (0.8 up to 0.21, 0.9 from 0.29)")
_WG_SHARE_ENV = _WG_SHARE is not None
WG_LATENCY_SHARE = 0.8 if _WG_SHARE is None else _WG_SHARE
#: Session 38 (session 37's fit, ``benchmarks/fit_split_model.py``): 0.1, not 0.25, up to density 0.21, where the sweeps
#: launched as the engine does (sessions 20 and 37, ``tests/data/splits_h200_s20_pdl.json``, ``..._s37_pdl_wg64.json``)
#: have the counts that fill every block slot fastest: o at N = 64 14.3 us at 11 splits against 16.0 at 8.  End to end
#: at 80 % (one H200, ``benchmarks/results/2026-12-02-s38/callA-B``): Llama-3-8B batch 48 / 64 5.627 / 6.078 ->
#: 5.580 / 6.033 ms a token (two rounds each), OPT-30B batch 32 18.31 -> 18.05, batch 64 24.33 -> 24.36.
WG_WS_WEIGHT = 0.1


def wg_split_model(density: float) -> tuple[float, float]:
    """:func:`plan`'s (lone-block share, partial-sum weight) for the Tiled-CSL warpgroup kernels at weight ``density``
    (0-1): ``WG_LATENCY_SHARE`` / ``WG_WS_WEIGHT`` up to density 0.21, ``WG_LATENCY_SHARE_DENSE`` /
    ``WG_WS_WEIGHT_DENSE`` from 0.29, linear between (the low ends at every density when ``FLASH_LLM_WG_LATENCY_SHARE``
    is set, with that share)."""
    t = 0.0 if _WG_SHARE_ENV else min(1.0, max(0.0, (density - 0.21) / 0.08))
    return (WG_LATENCY_SHARE + t * (WG_LATENCY_SHARE_DENSE - WG_LATENCY_SHARE),
            WG_WS_WEIGHT + t * (WG_WS_WEIGHT_DENSE - WG_WS_WEIGHT))


#: The same for the bitmap warpgroup kernels (``bitmap_spmm_*_wg<NB>``), fitted on their own sweep (session 10,
#: 28672 x 4096, 4096 x 14336, 9216 x 36864 and 36864 x 12288 at N = 32 / 64 / 128, 80 %): 1.00-1.05x the best split
#: (mean 1.011) against up to 1.16x (mean 1.041) for the slot model.  Their partial sums weigh less: the kernel
#: reads its weight at a smaller share of the bandwidth, so the same bytes cost less of its time.
BITMAP_WG_LATENCY_SHARE = 0.9
BITMAP_WG_WS_WEIGHT = 0.1


def tcsl_wg32_runs(n: int, density: float, elements: int = 0) -> bool:
    """Whether ``n`` tokens at weight ``density`` take the 32-token Tiled-CSL warpgroup kernel where ``wgmma`` runs:
    N = :data:`TCSL_WG32_MIN_N` (17) .. 32 from density :data:`TCSL_WG32_MIN_DENSITY`, and from
    :data:`TCSL_WG32_DENSE_MIN_N` (9) at densities from :data:`TCSL_WG32_PF4_MIN_DENSITY`, or from
    :data:`TCSL_WG32_PF3_MIN_DENSITY` on a weight of ``elements`` (M x K; 0: not known) up to
    :data:`TCSL_WG32_MID_MAX_ELEMENTS`."""
    if n > 32 or density < TCSL_WG32_MIN_DENSITY:
        return False
    if n >= TCSL_WG32_MIN_N:
        return True
    if n < TCSL_WG32_DENSE_MIN_N:
        return False
    return density >= TCSL_WG32_PF4_MIN_DENSITY or (
        density >= TCSL_WG32_PF3_MIN_DENSITY and 0 < elements <= TCSL_WG32_MID_MAX_ELEMENTS)


def tcsl_block(n: int, wgmma: bool = False, density: float = 1.0, elements: int = 0) -> tuple[str, int, int]:
    """The Tiled-CSL kernel for ``n`` tokens: (name suffix, tokens per block, weight rows per block).

    - N = 1: ``_n1``, on the CUDA cores (one warp per block, 64 rows; ``FLASH_LLM_TCSL_N1=0``: ``_nt1``).
    - N <= 32: one warp per block, ``_nt<NT>`` (8 NT tokens, 64 rows); but N = 17-32 at ``density`` >= 0.17 where
      ``wgmma``: ``_wg32x2``, the warpgroup kernel below with 32 tokens (``_wg32x2p3``, three prefetched rounds, at
      ``density`` >= :data:`TCSL_WG32_PF3_MIN_DENSITY`; ``_wg32x2p4``, four, at :data:`TCSL_WG32_PF4_MIN_DENSITY`,
      from N = 9, and ``_wg32x2p3`` from N = 9 on weights of at most ``elements`` (M x K)
      :data:`TCSL_WG32_MID_MAX_ELEMENTS`; :func:`tcsl_wg32_runs`).
    - N > 32 where ``wgmma`` (:func:`wgmma_ok`, and ``x`` allows 16-byte copies): warpgroup MMA, two warpgroups
      (128 rows) per block, ``_wg64x2`` (64 tokens) up to N = 64 (``_wg64x2s2``, two stages, at ``density`` >=
      :data:`TCSL_WG64_S2_MIN_DENSITY`), ``_wg128x2`` up to 128; above, ``_wg128x4``: four
      warpgroups (256 rows) share each X tile (H200, session 17, 9216 x 36864 at 80 %, N = 200-512: 5-11 % faster).
    - Elsewhere: ``_w2`` (N = 33-64), two warps of 32 tokens each sharing every tile's decode; ``_w4`` above, four.
    """
    if n == 1 and TCSL_N1:  # the CUDA-core kernel, with nt1's blocks and split-K
        return "n1", 8, ROWS_PER_BLOCK
    if wgmma and tcsl_wg32_runs(n, density, elements):
        pf = 4 if density >= TCSL_WG32_PF4_MIN_DENSITY else 3 if density >= TCSL_WG32_PF3_MIN_DENSITY else 2
        return ("wg32x2" if pf == 2 else f"wg32x2p{pf}"), 32, 64 * WG_ROWS
    if n <= 32:
        nt = _nt(n, TILED_CSL)
        return f"nt{nt}", 8 * nt, ROWS_PER_BLOCK
    if n <= 64:
        if not wgmma:
            return "w2", 64, ROWS_PER_BLOCK
        return ("wg64x2s2" if density >= TCSL_WG64_S2_MIN_DENSITY else "wg64x2"), 64, 64 * WG_ROWS
    if wgmma and n > WG_TOKENS:  # four warpgroups (256 rows) share each X tile: half the X copies per weight row
        return f"wg{WG_TOKENS}x4", WG_TOKENS, 64 * 4
    if wgmma:
        return f"wg{WG_TOKENS}x{WG_ROWS}", WG_TOKENS, 64 * WG_ROWS
    return "w4", 128, ROWS_PER_BLOCK


def wg_stages(kernel: str) -> int:
    """Pipeline stages of the Tiled-CSL warpgroup kernel ``kernel`` (:func:`tcsl_block`'s suffix, ``wg<NB>x<R>[s2|p3]``;
    ``INSTANTIATE_WG`` in spmm.cu): three from 64 tokens, so that a proxy fence every other tile suffices (session 14:
    3-7 % faster at N = 64 / 128); two for ``_wg32x2``, where a third would cost a block per SM, and ``_wg64x2s2``
    (:data:`TCSL_WG64_S2_MIN_DENSITY`)."""
    return 2 if kernel.endswith("s2") or kernel.startswith("wg32") else 3


def wg_shared_bytes(nb: int, rows: int, stages: int) -> int:
    """Dynamic shared memory of the Tiled-CSL warpgroup kernel with ``nb`` tokens, ``rows`` warpgroups per block and
    ``stages`` pipeline stages (:func:`wg_stages`; ``wg_smem_bytes`` in spmm.cu)."""
    return rows * stages * 8192 + stages * nb * 128 + 1024


def wgmma_ok(device_index: int) -> bool:
    """The warpgroup kernel runs here: compute capability 9.0 (its cubin is sm_90a), unless ``FLASH_LLM_WGMMA=0``."""
    if not _env_flag("FLASH_LLM_WGMMA", True):
        return False
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def kernel_config(fmt: int, dtype: torch.dtype, n: int, vec: bool, device_index: int,
                  density: float = 1.0, elements: int = 0) -> tuple[str, bool, int]:
    """``(name, wgmma, shared)``: the kernel ``spmm_cuda`` launches for ``n`` tokens at weight ``density``, whether
    warpgroup kernels may run (compute capability 9.0 and, for Tiled-CSL, X rows 16-byte aligned: ``vec``; the bitmap
    one copies X anyway), and its dynamic shared memory in bytes (0: static only)."""
    wg = (fmt == BITMAP or vec) and wgmma_ok(device_index)
    name = kernel_name(fmt, dtype, n, wg, density, elements)
    if fmt == BITMAP and "_wg" in name:
        return name, wg, bitmap_wg_shared_bytes(bitmap_wg_tokens(n))
    if fmt == TILED_CSL and "_wg" in name:
        kernel, tokens, rows = tcsl_block(n, True, density, elements)
        return name, wg, wg_shared_bytes(tokens, rows // 64, wg_stages(kernel))
    return name, wg, 0


def block_threads(name: str) -> int:
    """Threads per block of kernel ``name``: the Tiled-CSL kernels run one warp per block (``_nt<NT>``), W warps
    (``_w<W>``) or R warpgroups (``_wg<NB>x<R>``)."""
    if name.startswith("tiled_csl_spmm"):
        suffix = name.rsplit("_", 1)[1]
        if suffix.startswith("wg"):
            return 128 * int(suffix.split("x")[1][:1])  # R, one digit, then the variant (s2, p3) if any
        return 32 * int(suffix[1:]) if suffix.startswith("w") else 32
    return THREADS


def _dtype_suffix(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f16"


def kernel_name(fmt: int, dtype: torch.dtype, n: int, wgmma: bool = False, density: float = 1.0,
                elements: int = 0) -> str:
    """The spmm kernel that ``spmm_cuda`` launches for ``n`` tokens of ``dtype`` (``wgmma``, ``density``: see
    :func:`tcsl_block`)."""
    if fmt == TILED_CSL:
        return f"tiled_csl_spmm_{_dtype_suffix(dtype)}_{tcsl_block(n, wgmma, density, elements)[0]}"
    if wgmma and n >= BITMAP_WG_MIN_N:
        return f"bitmap_spmm_{_dtype_suffix(dtype)}_wg{bitmap_wg_tokens(n)}"
    return f"{_FORMAT_PREFIX[fmt]}_spmm_{_dtype_suffix(dtype)}_nt{_nt(n, fmt)}"


#: The bitmap warpgroup kernel runs from this N up where ``wgmma`` may run (``FLASH_LLM_BITMAP_WG_MIN_N``).  H200,
#: 9216 x 36864 at 80 % (benchmarks/RESULTS.md, session 9): 191 / 204 us at N = 8 / 16 against 151 / 174 for the
#: NT kernels, 209 / 264 / 362 us at N = 32 / 64 / 128 against 229 / 330 / 646.
BITMAP_WG_MIN_N = _env_int("FLASH_LLM_BITMAP_WG_MIN_N", 17, 0)


def bitmap_wg_tokens(n: int) -> int:
    """Tokens per block of the bitmap warpgroup kernel (``bitmap_spmm_<dtype>_wg<NB>``, sm_90a): 8, 16, 32, 64 or
    128."""
    for nb in (8, 16, 32, 64):
        if n <= nb:
            return nb
    return 128


def bitmap_wg_shared_bytes(nb: int) -> int:
    """Dynamic shared memory of the bitmap warpgroup kernel (``bw_smem_bytes`` in spmm.cu)."""
    return 2 * nb * 128 + 1024 + 16


def fragment_columns(x: torch.Tensor) -> torch.Tensor:
    """``x [N, K]`` with its columns in the bitmap fragments' k order inside every 64-column tile, zero-padded to
    a multiple of 64: column ``16 s + 8 q + 2 t + e`` of a tile is ``x``'s column ``16 t + 4 s + 2 q + e``
    (docs/formats.md, "The column order").  The bitmap warpgroup kernel's A registers hold W in that order."""
    n, k = x.shape
    kp = ceil_div(k, STRIP_K) * STRIP_K
    if kp != k:
        x = torch.nn.functional.pad(x, (0, kp - k))
    return x.reshape(n, kp // 64, 4, 4, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(n, kp)


def _nt(n: int, fmt: int) -> int:
    """8-token tiles per block for ``n`` tokens in format ``fmt`` (blocks along N cover the rest)."""
    return min(1 if n <= 8 else 2 if n <= 16 else 4 if n <= 32 else 8, _MAX_NT[fmt])


def _weight_bytes_per_element(fmt: int, density: float) -> float:
    """Bytes per weight element of format ``fmt`` at ``density`` (Tiled-CSL: at least its offsets, 4 per tile, so
    an empty weight is not free)."""
    return 0.125 + 2 * density if fmt == BITMAP else 4 * density + 4 / 4096


def plan(m: int, k: int, n: int, density: float, sms: int, blocks_per_sm: int = 8,
         splits: int | None = None, fmt: int = BITMAP, wgmma: bool = False) -> LaunchPlan:
    """Launch configuration for ``Y[n, m] = X[n, k] W[m, k]^T`` at weight ``density`` in format ``fmt``.

    Split-K heuristic (no per-shape tables): with ``C = sms * blocks_per_sm`` resident blocks, pick the
    number of K splits ``s`` that minimizes ``ceil(B / C) * C / B`` -- the idle share of the block
    slots over the waves of ``B = row_blocks * n_chunks * s`` equal blocks (under one wave, the
    unused SMs) -- times ``1 + ws``, where ``ws`` is the fp32 partial-sum traffic
    (``s * n * m * 8`` bytes, L2-resident) relative to the weight's bytes in its format, plus a
    small cost per split for the reduction (``FLASH_LLM_SPLITS`` overrides the choice for given shapes:
    :data:`SPLIT_OVERRIDES`).  Every split keeps at least 4 strips per warp (the Tiled-CSL N = 1
    kernel ``_n1``: 2 tiles, :data:`N1_MIN_TILES`; session 14, Llama-3-8B o at N = 1: 32 splits 10.7 us against 11.4
    for 16; ``_nt1`` and ``_nt2`` at N = 2-16: 2 tiles too, :data:`NT_MIN_TILES`).  A block covers
    ``block_tokens`` tokens and ``block_rows`` weight rows (:func:`tcsl_block`; ``wgmma`` as there).

    The Tiled-CSL warpgroup kernels (:func:`tcsl_block`: ``_wg<NB>x2``) are bound by the SM's throughput, not by each
    block's latency: an SM that holds fewer blocks runs each faster.  So their idle share counts work per SM: an SM
    with ``b = ceil(B / sms)`` blocks takes ``max(b, ceil(b / blocks_per_sm) * share * blocks_per_sm)`` block-times
    (a lone block still takes ``share`` of a full SM's round), against ``B / sms`` if the work were even; and their
    partial-sum traffic weighs less.  Both constants come from :func:`wg_split_model` and grow with the density.

    ``m``, ``k``, ``n``, ``sms`` and ``blocks_per_sm`` are at least 1, else a ValueError that names the first that is
    not: no tokens (or rows, columns) is nothing to plan (:func:`spmm_cuda` launches nothing for ``n = 0``).
    ``splits`` is None or an integer of at least 1 (TypeError / ValueError naming it), ``fmt`` :data:`BITMAP` or
    :data:`TILED_CSL` (DeltaRows' kernels make their own grids; ValueError), and ``density`` a finite number of at
    least 0 (TypeError / ValueError).  A density above 1 is taken: :func:`spmm_cuda` estimates it from the array's
    size, which counts the format's pads (a dense 65 x 65 Tiled-CSL weight: 1.0007).
    """
    if m < 1 or k < 1 or n < 1 or sms < 1 or blocks_per_sm < 1:
        what, v = next((w, v) for w, v in (("m", m), ("k", k), ("n", n), ("sms", sms),
                                           ("blocks_per_sm", blocks_per_sm)) if v < 1)
        raise ValueError(f"plan: {what} must be at least 1, got {v!r} ({m}x{k}x{n} on {sms} SMs, {blocks_per_sm} "
                         "blocks an SM)")
    if splits is not None:
        if isinstance(splits, bool) or not isinstance(splits, numbers.Integral):
            raise TypeError(f"plan: splits must be None or an integer, got {type(splits).__name__} {splits!r}")
        if splits < 1:
            raise ValueError(f"plan: splits must be at least 1 (or None for the heuristic), got {splits!r}")
        splits = int(splits)
    if isinstance(fmt, bool) or fmt not in _MAX_NT:
        raise ValueError(f"plan: fmt must be BITMAP ({BITMAP}) or TILED_CSL ({TILED_CSL}), got {fmt!r}"
                         + (" (DELTA_ROWS: its kernels make their own grids, not plan's)" if fmt == DELTA_ROWS else ""))
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"plan: density must be a number, got {type(density).__name__} {density!r}")
    if not (math.isfinite(density) and density >= 0):
        raise ValueError(f"plan: density must be a finite number of at least 0, got {density!r}")
    asked = splits if splits is not None else SPLIT_OVERRIDES.get((m, k, n))
    p = _plan(m, k, n, density, sms, blocks_per_sm, asked, fmt, wgmma)
    if asked is not None and p.splits != asked and (m, k, n, asked, p.splits) not in _split_warned:
        _split_warned.add((m, k, n, asked, p.splits))  # (a timing run must know what it timed)
        warnings.warn(f"{m}x{k}x{n}: {asked} splits asked (FLASH_LLM_SPLITS or splits=) run as {p.splits} splits of "
                      f"{p.kt_per_split} 64-column tiles ({ceil_div(k, STRIP_K)} tiles: each split takes whole, "
                      "equal runs of them)", RuntimeWarning, stacklevel=2)
    return p


_split_warned: set = set()


#: the module switches :func:`_plan` and the functions it calls read (``tests/test_plan_switches.py`` checks the list
#: against their bytecode): setting one on the module (a benchmark's A/B settings, a test's monkeypatch) clears its
#: cache, so the plans that follow are made under the new value, never a cached one made under another kernel's grid
_PLAN_SWITCHES = frozenset(("BITMAP_WG_LATENCY_SHARE", "BITMAP_WG_MIN_N", "BITMAP_WG_WS_WEIGHT", "N1_MIN_TILES",
                            "NT_MIN_TILES", "TCSL_N1", "TCSL_WG32_DENSE_MIN_N", "TCSL_WG32_MID_MAX_ELEMENTS",
                            "TCSL_WG32_MIN_DENSITY", "TCSL_WG32_MIN_N", "TCSL_WG32_PF3_MIN_DENSITY",
                            "TCSL_WG32_PF4_MIN_DENSITY", "TCSL_WG64_S2_MIN_DENSITY", "WG_LATENCY_SHARE",
                            "WG_LATENCY_SHARE_DENSE", "WG_ROWS", "WG_TOKENS", "WG_WS_WEIGHT", "WG_WS_WEIGHT_DENSE",
                            "_WG_SHARE_ENV"))


class _KernelsModule(types.ModuleType):
    """This module's class: assigning a :data:`_PLAN_SWITCHES` attribute clears :func:`_plan`'s cache (at the
    assignment, so a launch's plan lookup stays a plain cache hit)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _PLAN_SWITCHES:
            _plan.cache_clear()


sys.modules[__name__].__class__ = _KernelsModule


@functools.lru_cache(maxsize=4096)
def _plan(m: int, k: int, n: int, density: float, sms: int, blocks_per_sm: int = 8,
          splits: int | None = None, fmt: int = BITMAP, wgmma: bool = False) -> LaunchPlan:
    """:func:`plan` after its overrides (``SPLIT_OVERRIDES`` is looked up outside this cache; a switch it reads,
    set on the module, clears this cache: :data:`_PLAN_SWITCHES`)."""
    nt = _nt(n, fmt)
    kernel, block_tokens, block_rows = (tcsl_block(n, wgmma, density, m * k) if fmt == TILED_CSL
                                        else ("", 8 * nt, ROWS_PER_BLOCK))
    if fmt == BITMAP and wgmma and n >= BITMAP_WG_MIN_N:  # the bitmap warpgroup kernel
        block_tokens = bitmap_wg_tokens(n)
        kernel = f"wg{block_tokens}"
    if kernel.startswith("wg"):  # split-K partial tiles of the block's tokens, 32 at most (NT = 1, 2 or 4), at any n
        nt = min(4, block_tokens // 8)
    n_chunks = ceil_div(n, block_tokens)
    row_blocks = ceil_div(m, block_rows)
    kt = ceil_div(k, STRIP_K)
    if splits is None:
        slots = sms * blocks_per_sm
        weight_bytes = m * k * _weight_bytes_per_element(fmt, density) * n_chunks
        per_sm = kernel.startswith("wg")  # the warpgroup kernels
        share, ws_weight = (wg_split_model(density) if fmt == TILED_CSL
                            else (BITMAP_WG_LATENCY_SHARE, BITMAP_WG_WS_WEIGHT))
        ws_weight = ws_weight if per_sm else 0.5
        best = None
        min_tiles = N1_MIN_TILES if kernel == "n1" else NT_MIN_TILES if kernel in ("nt1", "nt2") else 4
        for s in range(1, max(1, min(64, kt // min_tiles)) + 1):
            kps = ceil_div(kt, s)
            if ceil_div(kt, kps) != s:
                continue
            blocks = row_blocks * n_chunks * s
            if per_sm:
                b = ceil_div(blocks, sms)
                idle = max(b, ceil_div(b, blocks_per_sm) * share * blocks_per_sm) * sms / blocks
            else:
                idle = ceil_div(blocks, slots) * slots / blocks
            ws = ws_weight * s * n * m * 8 / weight_bytes if s > 1 else 0.0
            cost = idle * (1 + ws) * (1 + 0.01 * s)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, s)
        splits = best[1]
    splits = max(1, min(splits, kt))
    kt_per_split = ceil_div(kt, splits)
    return LaunchPlan(nt, n_chunks, row_blocks, ceil_div(kt, kt_per_split), kt_per_split, block_tokens, block_rows)


class _Scratch:
    """Split-K tickets, per device and stream: counters the kernels zero again after use (the last block of a group
    resets its own), so one buffer serves every launch on a stream.  Kernels on two streams of a device may run at the
    same time, so each stream has its own (a buffer first asked for during a CUDA-graph capture lives in that graph's
    memory pool, zeroed by a captured memset).  Graphs captured on one stream share that stream's buffer: replay
    them one at a time (as the engine does), not concurrently on several streams."""

    def __init__(self):
        self.lock = threading.Lock()
        self.buffers: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        # buffers outgrown by a larger request: a CUDA graph captured before may still use one, so none is freed
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, stream: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """At least ``count`` zeroed elements of ``dtype`` for launches on ``stream`` (a ``cuda_stream`` handle) of
        ``device``: the kernels leave them zeroed (int32: split-K tickets; float32: the atomically summed split-K of
        :data:`NT_ATOMIC`)."""
        key = (device.index, stream, dtype)
        with self.lock:
            t = self.buffers.get(key)
            if t is None or t.numel() < count:
                if t is not None:
                    self.retired.append(t)
                t = torch.zeros(max(count, 4096), dtype=dtype, device=device)
                self.buffers[key] = t
            return t

    def get_tickets(self, device: torch.device, stream: int, count: int) -> torch.Tensor:
        """At least ``count`` zeroed tickets for launches on ``stream`` (a ``cuda_stream`` handle) of ``device``."""
        return self.get(device, stream, count, torch.int32)


_scratch = _Scratch()


def _density(fmt: int, data: torch.Tensor, m: int, k: int) -> float:
    """Density estimated from the array size alone (no device sync)."""
    if fmt == BITMAP:
        strips = ceil_div(m, STRIP_M) * ceil_div(k, STRIP_K)
        return max(0.0, (data.numel() * 4 - 128 * strips) / 2) / (m * k)
    return data.numel() / (m * k)


_static = threading.local()
#: ``FLASH_LLM_PDL_SPMM=0`` keeps the spmm launches plain even under :func:`static_weights`
PDL_SPMM = _env_flag("FLASH_LLM_PDL_SPMM", True)
#: ``FLASH_LLM_PDL_ATTN=0`` keeps the decode-attention launch plain under :func:`static_weights`
PDL_ATTN = _env_flag("FLASH_LLM_PDL_ATTN", True)
#: ... and only up to this batch x attended slots: above it the kernel's waiting blocks cost the kernel before it more
#: than the early launch saves (H200, session 17, Llama-3-8B at 80 %, batch 64 with up to 256 slots: 6.399 ms per
#: token launched programmatically, 6.284 plainly; at batch 1-16 the programmatic launch took 0.8 % off, session 15)
DECODE_ATTN_PDL_MAX_WORK = 8192
#: Which split-K reductions are launched programmatically (their blocks resident, waiting, while the spmm runs):
#: ``FLASH_LLM_PDL_REDUCE=wg`` (the default) after the N <= 16 one-warp kernels (``_nt1``, ``_nt2``) and the warpgroup
#: kernels above 32 tokens, ``nt1`` after the N <= 8 kernels only (sessions 7-15), ``all`` after every kernel, ``0``
#: none.  H200, session 16 (Llama-3-8B at 80 %, ``bench_e2e.py``, one process each): ``all`` against ``nt1`` took
#: batch 64 (``_wg64x2``) from 6.381 to 6.327 ms per token but batch 16 (``_nt2``) from 4.275 to 4.457, while ``_nt2``
#: still let its dependents launch at its start.  Since session 23 the one-warp kernels do so once their product is
#: done (spmm.cu, ``tiled_csl_trigger_at_start``): ``_nt2``'s programmatic reduction took batch 16 from 4.074-4.088 to
#: 4.005-4.006 ms at 80 % and from 4.907 to 4.825 at 70 %, and ``_nt1``'s late trigger batch 8 from 3.725-3.728 to
#: 3.589 at 80 % and from 4.592-4.595 to 4.424-4.425 at 70 % (each the same run, dense unchanged).
PDL_REDUCE = _env_choice("FLASH_LLM_PDL_REDUCE", "wg", ("wg", "nt1", "all", "0"), on="wg", off="0")


def parse_split_overrides(text: str) -> dict[tuple[int, int, int], int]:
    """``FLASH_LLM_SPLITS``: ``MxKxN=S`` entries separated by commas (``28672x4096x8=8,4096x14336x8=32``): launch
    ``Y[N, M] = X[N, K] W[M, K]^T`` with ``S`` K splits instead of :func:`plan`'s choice (a tuning and diagnostic aid
    for measuring a split count end to end; ``M`` is the merged weight's rows where projections are merged).  An entry
    that does not parse is left out with a warning that names it."""
    out: dict[tuple[int, int, int], int] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            shape, s = entry.split("=")
            m, k, n = (int(v) for v in shape.lower().split("x"))
            splits = int(s)
            if min(m, k, n, splits) < 1:
                raise ValueError
        except ValueError:
            warnings.warn(f"FLASH_LLM_SPLITS: {entry!r} is not MxKxN=S with positive integers; ignored",
                          RuntimeWarning, stacklevel=2)
            continue
        out[(m, k, n)] = splits
    return out


#: Split counts that replace :func:`plan`'s choice for given shapes (``FLASH_LLM_SPLITS``,
#: :func:`parse_split_overrides`)
SPLIT_OVERRIDES = parse_split_overrides(os.environ.get("FLASH_LLM_SPLITS", ""))


@contextlib.contextmanager
def static_weights():
    """Promise that no compressed weight changes while the block runs (the decode engine captures its CUDA graphs
    under it).  The Tiled-CSL spmm is then launched with programmatic dependent launch (sm_90): its blocks load the
    weight's offsets and first entries while the previous kernel, which writes ``x``, finishes, and wait for it
    (``griddepcontrol.wait``) before reading ``x`` or writing anything.  Outside the block a kernel that has just
    written a weight could still be running when the spmm reads it, so the launch is plain there.

    The decode-attention kernel is launched so too (:data:`PDL_ATTN`); it waits before reading anything.  It and the
    split-K reductions let the next kernel launch as soon as their blocks start, so the spmm that follows one of them
    loads its first weight entries while it runs."""
    before = getattr(_static, "on", False)
    _static.on = True
    try:
        yield
    finally:
        _static.on = before


#: Tiled-CSL with its warpgroup kernels runs the sparse kernel for N = 129-256 at densities up to this (80 % sparsity
#: and more) and weights of at least TCSL_WG_MIN_ELEMENTS elements: below, the expanded weight (2 bytes an element)
#: fits in the 50-60 MB L2 and the expansion path reads it back from there.  H200, session 13 (benchmarks/RESULTS.md,
#: bench_spmm.py, N = 256): 80 %: 0.51-0.71x of dense against 0.52-0.57x for the expansion (session 12's run) on the
#: 18 large layers, but 0.51 / 0.61x against 0.57 / 0.65x on Llama-3-8B qkv / o; 50 %: 0.28-0.40x against 0.41-0.52x.
TCSL_WG_MAX_DENSITY_ABOVE_128 = 0.25
TCSL_WG_MIN_ELEMENTS = 1 << 25


def use_sparse_kernel(n: int, density: float, fmt: int = BITMAP, wgmma: bool = False, elements: int = 0,
                      parts: int = 1) -> bool:
    """Sparse kernel for small N; expand + dense cuBLAS for large N (prefill); no tokens (``n < 1``): neither, False.
    ``elements`` is the weight's M x K, ``parts`` a DeltaRows weight's lanes a row (1: the split layout).
    Crossovers measured on H200 (benchmarks/RESULTS.md): bitmap up to N = 64, or 128 where its warpgroup kernel runs
    (``wgmma``; 9216 x 36864 at 80 %, N = 128: 362 us against about 650 for the expansion); Tiled-CSL up to N = 128,
    where its kernels for N > 64 (warpgroup MMA, or four warps sharing each tile's decode) beat the expansion (same
    shape, N = 128: 284 and 360 us against about 435), and up to N = 256 where its warpgroup kernel runs on a large,
    at least 80 % sparse weight (``TCSL_WG_MAX_DENSITY_ABOVE_128``, ``TCSL_WG_MIN_ELEMENTS``; session 13, same shape at
    80 %: N = 256 in 416-428 us; the expansion took 473 us in session 12's bench_spmm.py).  DeltaRows: N = 1 and its
    multi-token kernels up to :data:`DELTA_MULTI_MAX` (in chunks up to :data:`DELTA_CHUNK_MAX`), and its tensor-core
    kernel where :func:`dr_mma_ok` (``n`` tokens on ``parts`` lanes a row: the split layout only)."""
    if n < 1:
        return False
    if fmt == DELTA_ROWS:
        return n <= max(1, DELTA_MULTI_MAX, DELTA_CHUNK_MAX if DELTA_MULTI_MAX >= 2 else 0) or dr_mma_ok(n, parts)
    if fmt == TILED_CSL:
        return n <= 128 or (wgmma and n <= 256 and density <= TCSL_WG_MAX_DENSITY_ABOVE_128
                            and elements >= TCSL_WG_MIN_ELEMENTS)
    return n <= (128 if wgmma else 64)


def dispatches_sparse(n: int, fmt: int, data: torch.Tensor, m: int, k: int, device_index: int,
                      vec: bool = True) -> bool:
    """Whether :func:`spmm_cuda` (not forced) runs the sparse kernel for ``n`` tokens on this compressed weight
    (``fmt``, ``data``, ``[m, k]``) on device ``device_index``, as it decides: the density estimated from the array's
    size, the warpgroup kernels as X allows them (``vec``: ``k % 8 == 0`` and X's rows on 16 bytes, which Tiled-CSL's
    need), a DeltaRows weight's lanes a row read from ``data``'s size (its parts layout never takes the tensor-core
    kernel).  The one place that decides: :func:`spmm_cuda` and :func:`epilogue_fusable` both ask it; benchmarks label
    what ran with it."""
    if n < 1:
        return False
    if fmt == DELTA_ROWS:  # (no warpgroup kernels: no device query, so shapes alone answer on any machine)
        return use_sparse_kernel(n, _density(fmt, data, m, k), fmt, parts=_dr_parts(m, data))
    wg_ok = (fmt == BITMAP or bool(vec)) and wgmma_ok(device_index)
    return use_sparse_kernel(n, _density(fmt, data, m, k), fmt, wg_ok, m * k)


def _dr_parts(m: int, data: torch.Tensor) -> int:
    """Lanes a row of a DeltaRows weight of ``m`` rows, from its ``data``'s size alone (``delta_rows.layout``: the
    parts trailer)."""
    from ..formats.delta_rows import layout

    return layout(m, 0, data.numel()).parts


def decode_dense(fmt: int, data: torch.Tensor, offsets: torch.Tensor, m: int, k: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Expand a compressed weight to dense ``[m, k]`` with one CUDA kernel; with ``rows=(r0, r1)`` (``r0`` a
    multiple of 64) only those rows, as ``[r1 - r0, k]``."""
    dev = data.device
    if fmt == DELTA_ROWS:
        if rows is not None and tuple(rows) != (0, m):
            raise ValueError(f"rows {rows}: a DeltaRows weight expands whole (its rows are stored in their own order)")
        return _delta_rows_to_dense(data, offsets, m, k, dtype, out)
    r0, r1 = (0, m) if rows is None else rows
    if r0 % 64 or not 0 <= r0 < r1 <= m:
        raise ValueError(f"rows {r0}:{r1}: the start must be a multiple of 64 inside the {m} rows")
    m = r1 - r0
    out = torch.empty(m, k, dtype=dtype, device=dev) if out is None else out.view(m, k)
    kt = ceil_div(k, STRIP_K)
    stream = torch.cuda.current_stream(dev).cuda_stream
    if fmt == BITMAP:
        mt = ceil_div(m, STRIP_M)
        first = offsets.data_ptr() + (r0 // STRIP_M) * kt * offsets.element_size()  # offsets are absolute
        launch("bitmap_to_dense", (ceil_div(mt * kt, WARPS), 1, 1), THREADS,
               [(data.data_ptr(), P), (first, P), (out.data_ptr(), P), (m, I), (k, I), (mt, I),
                (kt, I)], stream, dev.index)
    else:
        tiles = ceil_div(m, 64) * kt
        first = offsets.data_ptr() + (r0 // 64) * kt * offsets.element_size()
        launch("tiled_csl_to_dense", (tiles, 1, 1), THREADS,
               [(data.data_ptr(), P), (first, P), (out.data_ptr(), P), (m, I), (k, I), (kt, I)],
               stream, dev.index)
    return out


def _delta_rows_to_dense(data, offsets, m, k, dtype, out=None) -> torch.Tensor:
    from ..formats.delta_rows import layout

    dev = data.device
    lay = layout(m, offsets.numel(), data.numel())
    slices, s = lay.slices, lay.splits
    stream = torch.cuda.current_stream(dev).cuda_stream
    rows_out = torch.empty(m, k, dtype=dtype, device=dev) if out is None else out.view(m, k)
    if DR_DENSE_ROWS and dr_dense_rows_ok(lay, k, rows_out):  # (writes every element: never zeroed first)
        launch_dr_dense_rows(data, offsets, rows_out, k, lay, stream, dev.index)
        return rows_out
    nofill = DR_DENSE_NOFILL  # (the _nf kernel writes every element itself: no zero fill, and the lanes a row)
    out = rows_out if nofill else rows_out.zero_()
    tiled = nofill and DR_DENSE_TILED
    warps = DR_DENSE_T_WARPS if tiled else DR_DENSE_NF_WARPS if nofill else DR_DENSE_WARPS
    name = (("delta_rows_to_dense_nftp" if DR_DENSE_T_PF else "delta_rows_to_dense_nft") if tiled
            else "delta_rows_to_dense_nf" if nofill else "delta_rows_to_dense")
    launch(name, (ceil_div(slices, warps), s, 1), 32 * warps,
           [(data.data_ptr(), P), (offsets.data_ptr(), P), (out.data_ptr(), P), (k, I), (s, I),
            (lay.parts if lay.coded else 0, I), (slices, I)] + ([(lay.parts, I)] if nofill else []),
           stream, dev.index)
    return out


#: warps (slices) a block of ``delta_rows_to_dense`` (at most 4, its launch bound; session 59: 1 and 4 time the same,
#: ``benchmarks/dr_expand.py --kernels delta_rows_to_dense:1,delta_rows_to_dense:4``)
DR_DENSE_WARPS = 4
#: ``delta_rows_to_dense_nf`` (session 61; the default since session 63): the expansion writes every element of its
#: output, zeros included, so the output is not zeroed first (the zero fill took a quarter of the expansion's time,
#: session 59).  Its ownership rule was checked on the CPU (``benchmarks/diag/dr_dense_emulate.py``); session 62 ran it
#: on an H200: bit for bit (``benchmarks/dr_expand.py``, the GPU test), compute-sanitizer clean, 1.4-1.8x faster than
#: the kernel with the fill alone (OPT-30B fc1 512 -> 366 us, Llama-3-8B gate / up 291 -> 162).  Session 63 timed the
#: prefill's kernels with and without it in one process (``benchmarks/prefill_ab.py``, H200, bf16, 80 %, a prompt of
#: 128): OPT-30B 93.0 -> 71.5 ms of kernels (the fill's 17.6 ms gone, the expansion 56.0 -> 52.0), time to first token
#: 120.0 -> 112.7 ms (medians of 6 interleaved rounds); Llama-3-8B 22.9 -> 18.9 ms of kernels (its time to first
#: token, 49-87 ms either way, is bound by the host's launches).  ``FLASH_LLM_DR_DENSE_NOFILL=0`` gives the fill back.
DR_DENSE_NOFILL = _env_flag("FLASH_LLM_DR_DENSE_NOFILL", True)
#: ... its warps a block (session 62: one ran OPT-30B's layers up to 7 % faster than four, Llama-3-8B's the same)
DR_DENSE_NF_WARPS = 1
#: with :data:`DR_DENSE_NOFILL`: ``delta_rows_to_dense_nft`` (session 63), the same ownership written through a
#: shared-memory tile a lane, whole 128-byte lines a store (``FLASH_LLM_DR_DENSE_TILED=1``).  Exact on an H100 (session
#: 65) but not faster: time to first token with the prefill's graph (``prefill_ab.py``, H100, session 68, median of 4,
#: ms, ``_nf`` / this / with the prefetch below) OPT-30B 93.9 / 95.7 / 94.3, Llama-3-8B 54.7 / 51.9 / 51.7 (each
#: spread 5-6 ms), so off
DR_DENSE_TILED = _env_flag("FLASH_LLM_DR_DENSE_TILED", False)
#: ... its warps a block (at most 4: its shared memory and launch bound)
DR_DENSE_T_WARPS = 4
#: ... with each lane's next group asked for a group ahead by ``cp.async`` (``delta_rows_to_dense_nftp``, session 64;
#: ``FLASH_LLM_DR_DENSE_T_PF=1``; timed above)
DR_DENSE_T_PF = _env_flag("FLASH_LLM_DR_DENSE_T_PF", False)
#: The parts layout (2-16 lanes a row, one split) expanded a slice a block through a tile of its whole rows in shared
#: memory, the lanes' groups placed in parallel (``delta_rows_to_dense_pr``, session 68; the default since session 69,
#: ``FLASH_LLM_DR_DENSE_ROWS=0`` for ``_nf``, whose lanes walk their entries one after another at 0.7-1.1 TB/s of dense
#: bytes), where the tile, ``32 / P`` rows of K, fits :data:`DR_DENSE_ROWS_SMEM` bytes (Llama-3-8B at batch 1: q/k/v
#: and o at 16 lanes a row 16 KiB, gate / up at 4 lanes 64 KiB); its zeros are written with the rows, so ``out`` is
#: not zeroed first either.  Session 69 on an H100 (bf16, 80 %): exact (the GPU test), Llama-3-8B q/k/v 68.2 -> 26.1
#: us and gate / up 236.2 -> 125.5 us (``benchmarks/dr_expand.py``; 1.9 TB/s of dense bytes, cuBLAS at N = 128 reads
#: them at 2.2-2.5), and the prefill's kernels 23.6 -> 15.7 ms (``benchmarks/prefill_ab.py``)
DR_DENSE_ROWS = _env_flag("FLASH_LLM_DR_DENSE_ROWS", True)
DR_DENSE_ROWS_SMEM = 64 * 1024
#: ... its warps a block (``DRP_WARPS`` in spmm.cu: each takes a group of every lane at a time)
DR_DENSE_ROWS_WARPS = 8
#: ... the columns of its rows a block writes (``FLASH_LLM_DR_DENSE_ROWS_BAND``; 0: whole rows, one block a slice, as
#: measured in session 69).  A band cuts the tile (Llama-3-8B's gate / up at 4 lanes a row: 64 KiB, three blocks an SM,
#: 1.55x the zero fill's time, where q/k/v's 16 KiB tiles run at its speed) for more blocks an SM, each block walking
#: all its slice's groups and keeping the band's nonzeros (session 69, not yet timed: ``dr_expand.py --kernels
#: delta_rows_to_dense_pr,delta_rows_to_dense_pr:2048,delta_rows_to_dense_pr:1024``)
DR_DENSE_ROWS_BAND = _env_int("FLASH_LLM_DR_DENSE_ROWS_BAND", 0, 0)
#: with :data:`DR_DENSE_ROWS`: the split layout (one lane a row; OPT's weights, Llama's down) the same way, a block a
#: (slice, split) through a band of its window's columns in shared memory (``delta_rows_to_dense_sr``, session 69; the
#: default, ``FLASH_LLM_DR_DENSE_SPLIT_ROWS=0`` for ``_nf``); K a multiple of 8.  Session 69 on an H100 (bf16, 80 %,
#: ``dr_expand.py``): exact, OPT-30B's expansions 1.34-1.79x faster (fc1 422 -> 305 us), Llama-3-8B's down 151 -> 80
#: us; OPT-30B's time to first token 83.3 -> 68.2 ms
DR_DENSE_SPLIT_ROWS = _env_flag("FLASH_LLM_DR_DENSE_SPLIT_ROWS", True)
#: ... the window columns a pass holds (32 rows of them: 64 KiB at 1024, three blocks an SM as ``_pr``'s largest
#: tile); a wider window (OPT-30B's q/k/v and fc2 at 80 %: 1700-2800 columns) takes more passes, each walking the
#: split's groups again (the walk is some 8x under the bytes' time).  Session 69: 512 as fast, 2048 (one block an SM)
#: 1.3-1.9x slower; session 70, with :data:`DR_PLACE_SKIP`: 768 (48 KiB, four blocks an SM) as fast as 1024 or faster on
#: every OPT-30B and Llama-3-8B split-layout weight (o 76 -> 68 us), so 768
DR_DENSE_SR_BAND = _env_int("FLASH_LLM_DR_DENSE_SR_BAND", 768, 0)
#: ... at most this many (96 KiB of tile: within every sm_80+ GPU's shared memory a block, 99 KiB on sm_86 / sm_89; a
#: larger setting is cut to it, never a failed launch)
DR_DENSE_SR_BAND_MAX = 1536
#: the chunks of 8 groups a block of ``_sr`` / ``_pr`` has in flight while it places one (``FLASH_LLM_DR_PLACE_AHEAD``;
#: session 70): 1 as sessions 68-69 measured (``delta_rows_to_dense_sr`` / ``_pr``), more: 4 (``_sr4``; the parts
#: layout's ``_pr4``, for tiles above :data:`DR_PLACE_AHEAD_PR_MIN_TILE` bytes only: q/k/v's small tiles keep ``_pr``'s
#: 32 registers and 8 blocks an SM).  Asked because a block of ``_sr`` places its split in chunks that each wait for one
#: load; session 70 (H100): no faster at first (OPT-30B's expansions +0-3 %), but the loads were not in flight (a copy
#: of the coded steps word waited for each at once); with that fixed, ``_pr4`` ran gate / up 118 -> 111 us and ``_sr4``
#: within 2 % of ``_srk``.  Session 74 (H100, bf16, 80 %): ``_srk4`` against ``_srk`` OPT-30B q/k/v 208 -> 188 us,
#: fc2 294 -> 264, Llama-3-8B gate / up (``_pr4``) 116 -> 111; the prefill in a CUDA graph OPT-30B 62.2 -> 60.0 ms,
#: Llama-3-8B 14.3 -> 14.1 (three rounds, one process each), so 4 is the default
DR_PLACE_AHEAD = _env_int("FLASH_LLM_DR_PLACE_AHEAD", 4, 1, 4)
DR_PLACE_AHEAD_PR_MIN_TILE = _env_int("FLASH_LLM_DR_PLACE_AHEAD_PR_MIN_TILE", 32 * 1024, 0)
#: ``_sr``'s passes skip the groups whose columns miss their band (``delta_rows_to_dense_srk``; session 70, the default:
#: ``FLASH_LLM_DR_PLACE_SKIP=0`` for ``_sr``): a window of several bands walked every group once a pass (Nsight Compute:
#: 104 M warp instructions at 0.48 issued a scheduler on OPT-30B's q/k/v).  Session 70 (H100, bf16, 80 %): OPT-30B's
#: fc1 / fc2 305 / 320 -> 294 / 313 us, with bands of 768 (below) 294 / 301 and o 75 -> 68; its prefill's graph 67.8
#: -> 66.6 ms (one process, three rounds)
DR_PLACE_SKIP = _env_flag("FLASH_LLM_DR_PLACE_SKIP", True)
#: the placement by ranges of groups a warp (``delta_rows_to_dense_srw`` / ``_prw``, ``FLASH_LLM_DR_PLACE_RANGES=1``;
#: session 70, not yet run on a GPU): warp w walks the contiguous eighth w of every lane's groups after one pre-pass of
#: their step sums and one barrier, where ``dr_place`` meets at a barrier every 8 groups (20 % of ``_srk``'s stall
#: samples); ``_srw`` skips as ``_srk`` and both keep 2 groups' loads in flight.  Takes precedence over AHEAD / SKIP
DR_PLACE_RANGES = _env_flag("FLASH_LLM_DR_PLACE_RANGES", False)


def dr_dense_rows_ok(lay, k: int, out: torch.Tensor) -> bool:
    """Whether ``delta_rows_to_dense_pr`` takes a DeltaRows weight of layout ``lay`` (``delta_rows.layout``) and K
    ``k`` into ``out``: the parts layout, its tile of ``32 / P`` rows (of :func:`dr_dense_rows_band` columns) within
    :data:`DR_DENSE_ROWS_SMEM`, ``out`` on 16 bytes; or, with :data:`DR_DENSE_SPLIT_ROWS`, ``delta_rows_to_dense_sr``
    the split layout (``k % 8 == 0``)."""
    if out.data_ptr() % 16 or not lay.splits:
        return False
    if lay.parts == 1:
        return DR_DENSE_SPLIT_ROWS and k % 8 == 0
    return lay.splits == 1 and (32 // lay.parts) * dr_dense_rows_band(k) * 2 <= DR_DENSE_ROWS_SMEM


def launch_dr_dense_rows(data, offsets, out, k: int, lay, stream: int, device_index: int) -> None:
    """``delta_rows_to_dense_pr`` into ``out`` (where :func:`dr_dense_rows_ok`): a block a slice, its rows' tile in
    dynamic shared memory; for the split layout ``delta_rows_to_dense_sr``: a block a (slice, split), a band of its
    window in shared memory (``_srk`` with :data:`DR_PLACE_SKIP`, ``_sr4`` / ``_pr4`` with :data:`DR_PLACE_AHEAD`,
    ``_srk4`` with both; ``_srw`` / ``_prw`` with :data:`DR_PLACE_RANGES`, whatever the others say)."""
    args = [(data.data_ptr(), P), (offsets.data_ptr(), P), (out.data_ptr(), P), (k, I)]
    if lay.parts == 1:
        band = dr_dense_sr_band(k)
        name = "delta_rows_to_dense_sr" + ("w" if DR_PLACE_RANGES else ("k" if DR_PLACE_SKIP else "")
                                          + _place_ahead_suffix())
        launch(name, (lay.slices, lay.splits, 1), 32 * DR_DENSE_ROWS_WARPS,
               args + [(lay.splits, I), (1 if lay.coded else 0, I), (lay.slices, I), (band, I)], stream,
               device_index, 32 * band * 2)
        return
    band = dr_dense_rows_band(k)
    tile = (32 // lay.parts) * band * 2
    ahead = "w" if DR_PLACE_RANGES else "4" if _place_ahead_suffix() and tile > DR_PLACE_AHEAD_PR_MIN_TILE else ""
    launch("delta_rows_to_dense_pr" + ahead, (lay.slices, ceil_div(k, band), 1), 32 * DR_DENSE_ROWS_WARPS,
           args + [(lay.parts if lay.coded else 0, I), (lay.slices, I), (lay.parts, I), (band, I)], stream,
           device_index, (32 // lay.parts) * band * 2)


def _place_ahead_suffix() -> str:
    """The ``_sr`` kernel's suffix for :data:`DR_PLACE_AHEAD` (1: none; more: 4)."""
    return "" if DR_PLACE_AHEAD <= 1 else "4"


def dr_dense_rows_band(k: int) -> int:
    """The columns a block of ``delta_rows_to_dense_pr`` writes: K, or :data:`DR_DENSE_ROWS_BAND` (a multiple of 8)
    where that is set and smaller."""
    return k if DR_DENSE_ROWS_BAND <= 0 else max(8, min(DR_DENSE_ROWS_BAND // 8 * 8, k))


def dr_dense_sr_band(k: int) -> int:
    """The window columns a pass of ``delta_rows_to_dense_sr`` holds: :data:`DR_DENSE_SR_BAND` (at most
    :data:`DR_DENSE_SR_BAND_MAX`, a multiple of 8), or K where less."""
    return max(8, min(min(DR_DENSE_SR_BAND, DR_DENSE_SR_BAND_MAX) // 8 * 8, ceil_div(k, 8) * 8))


_DR_RESID, _DR_RMS, _DR_SILU, _DR_LN, _DR_RELU = 1, 2, 4, 8, 16  # spmm.cu: DR_RESID, DR_RMS, ... (the mode bits)
DR_WARPS = 4  # spmm.cu: slices per block of the DeltaRows kernel, sharing one staged X window
DR_WMAX = 1536  # spmm.cu: the widest X window the split layout's _n1 kernel stages as fp32


#: DeltaRows runs its multi-token kernels (``delta_rows_spmm_<dtype>_nt<2|4|8>``) for 2 <= N <= this; above, the
#: expansion and cuBLAS (``FLASH_LLM_DELTA_MULTI_MAX=1``: the expansion from N = 2)
DELTA_MULTI_MAX = _env_int("FLASH_LLM_DELTA_MULTI_MAX", 8, 1, 8)


#: DeltaRows runs its tensor-core kernel (``delta_rows_spmm_<dtype>_mma<8|16|32>``, the split layout) for
#: ``DR_MMA_MIN <= N <= DR_MMA_MAX`` tokens (``FLASH_LLM_DR_MMA_MIN`` / ``FLASH_LLM_DR_MMA_MAX``; session 60); the
#: parts layout, and N past the range, take the multi-token kernels or the expansion as before.  **Off by default**
#: (``DR_MMA_MIN`` 33): correct since session 61's fix (its GPU test passed in session 62, compute-sanitizer clean),
#: but slower than the token chunks (:data:`DELTA_CHUNK_MAX`) on 6 of 8 layer shapes at 16 tokens and 8 of 8 at 32, and
#: 2-3x slower than Tiled-CSL, which an engine holds from batch 4 (session 62, H200, ``benchmarks/dr_mma.py``:
#: Llama-3-8B gate / up at 16 tokens 119.9 us, chunks 124.5, Tiled-CSL 44.2, cuBLAS 62.4; ``docs/kernels.md``).
DR_MMA_MIN = _env_int("FLASH_LLM_DR_MMA_MIN", 33, 0)
DR_MMA_MAX = _env_int("FLASH_LLM_DR_MMA_MAX", 32, 0)
DRM_WARPS = 2  # spmm.cu: warps (slices) a block of the tensor-core kernel
#: the tensor-core kernel stages X through a ring in shared memory a round ahead (``_mma<NT>x``; NT = 8, 16, K % 8 ==
#: 0, X on 16 bytes) instead of loading its B fragments from global memory in the drain (``FLASH_LLM_DR_MMA_XRING=0``)
DR_MMA_XRING = _env_flag("FLASH_LLM_DR_MMA_XRING", True)


#: DeltaRows runs ``DELTA_MULTI_MAX < N <= DELTA_CHUNK_MAX`` tokens as chunks of at most ``DELTA_MULTI_MAX`` through
#: its multi-token kernels (:func:`dr_token_chunks`) instead of expanding the weight (``FLASH_LLM_DELTA_CHUNK_MAX``;
#: session 60).  Session 62 (H200, ``benchmarks/dr_mma.py`` and ``dr_expand.py`` in one session, bf16 coded, 80 %): at
#: 16 tokens two chunks beat the expansion on every Llama-3-8B and OPT-30B layer, 1.5-2.4x even against the expansion
#: without its zero fill (gate / up 124.5 us against about 162 + 62, OPT-30B fc1 248 against about 366 + 102); at 32
#: the expansion without the fill wins on OPT-30B's q/k/v and ties elsewhere.  So 16 (8: no chunks)
DELTA_CHUNK_MAX = _env_int("FLASH_LLM_DELTA_CHUNK_MAX", 16, 0)


def dr_token_chunks(n: int) -> list[tuple[int, int]]:
    """The token ranges ``[(i, j), ...]`` that :data:`DELTA_CHUNK_MAX` runs ``n`` tokens in, in order: ``ceil(n /
    DELTA_MULTI_MAX)`` chunks of at most :data:`DELTA_MULTI_MAX` tokens, as even as possible, so that from
    ``DELTA_MULTI_MAX = 3`` on each chunk of ``n >= 2`` tokens holds 2 or more and runs a multi-token kernel.  Each
    token's sums are its own, so the chunks change no token's value.  ``DELTA_MULTI_MAX = 2`` cannot split an odd
    ``n`` into pairs: its chunks are the pairs, then the last token alone, which runs the N = 1 kernel (the same to
    rounding, not bit for bit: another summation order).  ``DELTA_MULTI_MAX = 1`` (no multi-token kernels: the
    caller expands the weight instead of chunking) gives one token a chunk; ``n = 0`` none."""
    c = max(1, DELTA_MULTI_MAX)
    if n < 1:
        return []
    if c == 2:  # (pairs, then an odd n's last token)
        return [(i, min(i + 2, n)) for i in range(0, n, 2)]
    parts = -(-n // c)
    edges = [n * p // parts for p in range(parts + 1)]
    return [(edges[p], edges[p + 1]) for p in range(parts)]


#: with the tensor-core kernel on (:data:`DR_MMA_MIN`): ``delta_rows_spmm_<dtype>_tmma<NT>`` instead of ``_mma<NT>``
#: where ``K % 8 == 0`` and X lies on 16 bytes (``FLASH_LLM_DR_MMA_TILE=1``; session 69, not yet run on a GPU): a
#: block a (slice, split) places the split's nonzeros into a tile of its window as ``delta_rows_to_dense_sr`` does (the
#: 8 warps on 8 groups of every lane at once, no dependent chain a warp), then multiplies the tile on the tensor
#: cores, in passes of :data:`DR_MMA_TILE_BAND` window columns (``docs/kernels.md``, "What session 69's expansions
#: suggest")
DR_MMA_TILE = _env_flag("FLASH_LLM_DR_MMA_TILE", False)
#: ... its band (``FLASH_LLM_DR_MMA_TILE_BAND``; a multiple of 16 from 256 to 1024: shared memory (32 + NT) (2 band +
#: 16) bytes, 50 KiB at 512 columns and 16 tokens)
DR_MMA_TILE_BAND = _env_int("FLASH_LLM_DR_MMA_TILE_BAND", 512, 0)
DRTM_WARPS = 8  # spmm.cu: warps a block of the _tmma kernels


def dr_mma_tile_band() -> int:
    """:data:`DR_MMA_TILE_BAND` as a multiple of 16 within 256 .. 1024 (below 256 the warps' sums would not fit the
    shared memory they reuse; above 1024 at 32 tokens the tile and X pass 128 KiB)."""
    return max(256, min(1024, DR_MMA_TILE_BAND // 16 * 16))


def dr_mma_ok(n: int, parts: int) -> bool:
    """Whether ``n`` tokens on a DeltaRows weight of ``parts`` lanes a row run the tensor-core kernel."""
    return parts == 1 and max(DR_MMA_MIN, 1) <= n <= min(DR_MMA_MAX, 32)


def _dr_reduce(ws, y, bias, s, n, m, mode, stream, dev, pdl) -> None:
    """``delta_rows_reduce_<dtype>``: ``y`` (``[n, m]``, or ``[n, m / 2]`` with ``DR_SILU``) from the fp32 partials
    ``ws [s, n, m]``, summed in split order with the bias and the ``mode``'s epilogue."""
    m_out = m // 2 if mode & _DR_SILU else m
    launch(f"delta_rows_reduce_{_dtype_suffix(y.dtype)}", (ceil_div(n * m_out, 256), 1, 1), 256,
           [(ws.data_ptr(), P), (y.data_ptr(), P), (bias.data_ptr() if bias is not None else 0, P), (s, I), (n, I),
            (m, I), (mode, I)], stream, dev.index, 0, pdl=pdl)


def _delta_rows_mma(x, data, offsets, m, k, bias, out, act, add_to) -> torch.Tensor:
    """``DR_MMA_MIN <= N <= 32`` tokens on a split-layout DeltaRows weight: ``delta_rows_spmm_<dtype>_mma<NT>``
    (NT = 8, 16 or 32: N rounded up) expands each warp's 32 rows into a ring of columns in shared memory and multiplies
    the finished 16-column blocks on the tensor cores, storing each split's partials ``[S, N, M]`` (fp32);
    ``delta_rows_reduce_<dtype>`` sums them in split order with the bias, ``add_to`` or (paired) SiLU x up."""
    from ..formats.delta_rows import layout

    n = x.shape[0]
    dev = x.device
    x = x.contiguous()
    lay = layout(m, offsets.numel(), data.numel())
    slices, s = lay.slices, lay.splits
    nt = 8 if n <= 8 else 16 if n <= 16 else 32
    y, mode = _dr_out(x, m, out, act, None, add_to)
    stream = torch.cuda.current_stream(dev).cuda_stream
    suffix = _dtype_suffix(x.dtype)
    pdl = PDL_SPMM and getattr(_static, "on", False)
    ws = torch.empty(s * n * m, dtype=torch.float32, device=dev)
    coded = "c" if lay.coded else ""
    last = 0
    if DR_MMA_TILE and k % 8 == 0 and x.data_ptr() % 16 == 0:  # (the block-parallel placement, session 69)
        last = dr_mma_tile_band()  # (the last argument: the band; _mma's: X's load width)
        # the band's tile and X within the device's shared memory (sm_86 / 89 / 120 take 99 KiB: a band over 768
        # asked more until session 87, and the launch failed); below 256 the _mma kernel runs instead
        lim = dynamic_shared_limit(dev, f"delta_rows_spmm_{suffix}_tmma{nt}{coded}")
        if lim is not None:
            last = min(last, (lim // (32 + nt) - 16) // 2 // 16 * 16)
    if last >= 256:
        name, grid, warps, smem = f"tmma{nt}{coded}", (slices, s, 1), DRTM_WARPS, (32 + nt) * (2 * last + 16)
    else:
        xring = DR_MMA_XRING and nt <= 16 and k % 8 == 0 and x.data_ptr() % 16 == 0
        name, grid, warps, smem = f"mma{nt}{coded}{'x' if xring else ''}", (ceil_div(slices, DRM_WARPS), s, 1), \
            DRM_WARPS, 0
        last = int(k % 2 == 0 and x.data_ptr() % 4 == 0)
    launch(f"delta_rows_spmm_{suffix}_{name}", grid, 32 * warps,
           [(data.data_ptr(), P), (offsets.data_ptr(), P), (x.data_ptr(), P), (ws.data_ptr(), P), (s, I), (n, I),
            (k, I), (m, I), (slices, I), (last, I)], stream, dev.index, smem, pdl=pdl)
    _dr_reduce(ws, y, bias, s, n, m, mode, stream, dev, pdl)
    return y


def _delta_rows_cuda(x, data, offsets, m, k, bias, out, act, norm, add_to) -> torch.Tensor:
    """:func:`spmm_cuda` for a DeltaRows weight: the one-row-per-lane kernel at N = 1 (the parts layout's kernel for
    a weight of P > 1 lanes a row, where all of X fits the device's shared memory: :func:`parts_n1_fits`), with the
    bias, ``add_to``, ``norm`` and (for a weight with paired halves) ``act`` inside; at 2 <= N <=
    :data:`DELTA_MULTI_MAX` the multi-token kernel and its reduction (bias, ``add_to`` and, paired, ``act`` in the
    reduction; ``norm`` before, as a separate operation); else the expansion and cuBLAS, ``act`` and ``norm`` as
    separate operations."""
    from ..formats.delta_rows import layout

    n = x.shape[0]
    dev = x.device
    lay = layout(m, offsets.numel(), data.numel())
    if lay.coded and x.dtype != torch.bfloat16:  # (coded values: bf16 kernels only; the expansion decodes them too)
        raise ValueError(f"x: a DeltaRows weight with coded values is bf16, got x in {x.dtype}")
    if dr_mma_ok(n, lay.parts):
        if norm is not None or act == "relu" or (act is not None and not lay.paired):
            return _unfused(x, data, offsets, DELTA_ROWS, m, k, bias, None, False, out, None, act, norm, add_to)
        return _delta_rows_mma(x, data, offsets, m, k, bias, out, act, add_to)
    if DELTA_MULTI_MAX >= 2 and DELTA_MULTI_MAX < n <= DELTA_CHUNK_MAX:  # chunks through the multi-token kernels
        y = _dr_out(x, m, out, act, None, add_to)[0]
        for i, j in dr_token_chunks(n):
            _delta_rows_cuda(x[i:j], data, offsets, m, k, bias, None if add_to is not None else y[i:j], act, norm,
                             y[i:j] if add_to is not None else None)
        return y
    g, eps, rscale = _norm_kernel_args(norm, x.dtype)  # (the kernels' weight, eps and factor scale; none: None)
    if 2 <= n <= DELTA_MULTI_MAX:
        nt_norm = norm is not None and dr_nt_norm_ok(
            n, k, lay.parts, norm, _parts_nt_limit(x.dtype, 2, lay.coded, dev) if n == 2 and lay.parts > 1 else None)
        if (norm is not None and not nt_norm) or act == "relu" or (act is not None and not lay.paired):
            return _unfused(x, data, offsets, DELTA_ROWS, m, k, bias, None, False, out, None, act, norm, add_to)
        if nt_norm:  # (the kernel stages X and the norm's weight by 16-byte loads)
            x, norm = _aligned16(x.contiguous()), (_aligned16(g.contiguous()), eps)
        return _delta_rows_multi(x, data, offsets, m, k, bias, out, act, add_to, norm if nt_norm else None, rscale)
    ln_bias = norm[1] if norm is not None and len(norm) == 3 else None
    # (the parts layout's kernel stages all of X: where that does not fit the device, the expansion, below)
    parts_kernel = _parts_n1_kernel(x.dtype, lay, k, dev) if n == 1 and lay.parts > 1 else None
    fused = n == 1 and (lay.parts == 1 or parts_kernel is not None) and (act in (None, "relu") or lay.paired) and (
        norm is None or all(t is None or (t.is_contiguous() and t.data_ptr() % 4 == 0) for t in (g, ln_bias)))
    if not fused:
        if act is not None or norm is not None or add_to is not None:
            return _unfused(x, data, offsets, DELTA_ROWS, m, k, bias, None, False, out, None, act, norm, add_to)
        if n == 0:
            return torch.empty(0, m, dtype=x.dtype, device=dev) if out is None else out
        return _expand_and_gemm(x, data, offsets, DELTA_ROWS, m, k, bias, out)
    x = x.contiguous()
    if lay.parts > 1:
        return _delta_rows_parts(x, data, offsets, m, k, bias, out, act, norm, add_to, lay, (g, eps, rscale),
                                 parts_kernel)
    slices, mp, s = lay.slices, lay.mp, lay.splits
    vec = int(k % 8 == 0 and x.data_ptr() % 16 == 0 and (g is None or g.data_ptr() % 16 == 0)
              and (ln_bias is None or ln_bias.data_ptr() % 16 == 0))
    stream = torch.cuda.current_stream(dev).cuda_stream
    y, mode = _dr_out(x, m, out, act, norm, add_to)
    ws = torch.empty(s * mp + slices * s, dtype=torch.float32, device=dev)
    tickets = _scratch.get_tickets(dev, stream, slices)
    launch(f"delta_rows_spmm_{_dtype_suffix(x.dtype)}_n1{'c' if lay.coded else ''}", (ceil_div(slices, DR_WARPS), s, 1),
           32 * DR_WARPS,
           [(data.data_ptr(), P), (offsets.data_ptr(), P), (x.data_ptr(), P), (y.data_ptr(), P),
            (bias.data_ptr() if bias is not None else 0, P), (ws.data_ptr(), P), (tickets.data_ptr(), P), (s, I),
            (vec, I), (mode, I), (g.data_ptr() if g is not None else 0, P), (eps, ctypes.c_float),
            (rscale, ctypes.c_float), (k, I),
            (slices, I), (ln_bias.data_ptr() if ln_bias is not None else 0, P)],
           stream, dev.index, 0, pdl=PDL_SPMM and getattr(_static, "on", False))
    return y


def dr_nt_norm_ok(n: int, k: int, parts: int, norm: tuple | None = None, limit: int | None = None) -> bool:
    """Whether DeltaRows' multi-token kernels take an RMSNorm ``norm = (weight, eps)`` inside (:data:`DR_NT_NORM`): 2
    tokens on the parts layout (its window is all of K) with ``K % 8 == 0`` and a parts window that fits shared
    memory (:func:`parts_nt_window`, ``limit`` as there); not a LayerNorm."""
    return (DR_NT_NORM and n == 2 and parts > 1 and k % 8 == 0 and parts_nt_window(k, 2, limit) > 0
            and (norm is None or len(norm) == 2))


def _dr_out(x, m, out, act, norm, add_to) -> tuple[torch.Tensor, int]:
    """The DeltaRows kernels' output for ``x``'s N tokens (``add_to``, ``out`` or a fresh ``[N, m]``, ``[N, m / 2]``
    with SiLU x up) and their mode bits (``DR_*`` in spmm.cu)."""
    silu = act == "silu_mul"
    y = add_to if add_to is not None else out if out is not None else \
        torch.empty(x.shape[0], m // 2 if silu else m, dtype=x.dtype, device=x.device)
    mode = ((_DR_RESID if add_to is not None else 0) | (_DR_SILU if silu else 0) | (_DR_RELU if act == "relu" else 0)
            | (0 if norm is None else _DR_RMS if len(norm) == 2 else _DR_LN))
    return y, mode


def _aligned16(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (contiguous), or a fresh copy where its start is not on 16 bytes (the parts kernel reads 16-byte rows)."""
    return t if t is None or t.data_ptr() % 16 == 0 else t.clone()


#: ``FLASH_LLM_DELTA_PARTS_STAGE``: 1 stages X as fp32 in the parts layout's N = 1 kernel where it fits (tests,
#: tuning); else 16-bit (H100, session 68, Llama-3-8B bf16 at 80 %, batch 1: 2.042 / 2.044 -> 2.043 / 2.048 ms)
PARTS_STAGE = _env_int("FLASH_LLM_DELTA_PARTS_STAGE", 0, 0, 2)
#: the most bytes of X a parts-layout block stages in dynamic shared memory (N = 1 as fp32: ``4 K``; 2-8 tokens:
#: ``NT x 2 K``, K = 4096 at NT = 8 takes 64 KB), and never more than the device lets the kernel have
#: (:func:`dynamic_shared_limit`: 99 KiB a block on sm_86 / sm_89, less the kernel's static 10-21 KB)
DR_NT_STAGE_MAX = 96 * 1024


def _stage_cap(limit: int | None) -> int:
    """:data:`DR_NT_STAGE_MAX`, or the device's ``limit`` (:func:`dynamic_shared_limit`) where that is less."""
    return DR_NT_STAGE_MAX if limit is None else min(DR_NT_STAGE_MAX, limit)


def parts_stage(k: int, limit: int | None = None) -> int:
    """How the parts layout's N = 1 kernel stages X: 2 (16-bit, ``2 K`` bytes a block), or 1 (fp32, one instruction
    less an entry) where :data:`PARTS_STAGE` asks for it and ``4 K`` bytes fit :data:`DR_NT_STAGE_MAX` and ``limit``
    (the ``_s1`` kernel's dynamic shared memory on the device, :func:`dynamic_shared_limit`; None: no device limit).

    Session 30 took fp32 where the grid still fit one wave; in a decode step, where each launch's blocks become
    resident while the launch before runs, the smaller blocks won (session 31, H200, Llama-3-8B at 80 %, batch 1: a
    step 2175 -> 2067 us; OPT-30B with its K = 7168 projections in the parts layout 6938 -> 6596 us)."""
    return 1 if PARTS_STAGE == 1 and 4 * k <= _stage_cap(limit) else 2


def parts_n1_fits(k: int, stage: int, limit: int | None) -> bool:
    """Whether the parts layout's N = 1 kernel, staging all ``k`` columns of X (``stage``: :func:`parts_stage`), fits
    ``limit`` bytes of dynamic shared memory (:func:`dynamic_shared_limit`; None: no device limit).  It has no
    fallback that reads X from global memory: where it does not fit (sm_86 / sm_89 above K = 40432), the weight is
    expanded and multiplied by cuBLAS, as for a batch too large for the sparse kernels."""
    return limit is None or k * (4 if stage == 1 else 2) <= limit


def _parts_n1_kernel(dtype: torch.dtype, lay, k: int, device: torch.device) -> tuple[str, int] | None:
    """The parts layout's N = 1 kernel for a weight of layout ``lay`` and ``k`` columns on ``device``, and its
    dynamic shared memory: ``(name, bytes)``; None where X does not fit the device (:func:`parts_n1_fits`)."""
    base = f"delta_rows_parts_{_dtype_suffix(dtype)}_p{lay.parts}_s"
    if lay.coded:  # (coded: X staged 16-bit only)
        stage = 2
    else:  # (the device's limit asked only where fp32 is asked for)
        stage = parts_stage(k, dynamic_shared_limit(device, base + "1") if PARTS_STAGE == 1 else None)
    name = f"{base}{stage}{'c' if lay.coded else ''}"
    if not parts_n1_fits(k, stage, dynamic_shared_limit(device, name)):
        return None
    return name, k * (4 if stage == 1 else 2)


def _delta_rows_parts(x, data, offsets, m, k, bias, out, act, norm, add_to, lay, kernel_norm,
                      kernel: tuple[str, int]) -> torch.Tensor:
    """N = 1 on a DeltaRows weight of the parts layout: ``delta_rows_parts_<dtype>_p<P>_s<1|2>`` (one launch, no
    split-K, every epilogue inside); ``kernel``: its name and dynamic shared memory (:func:`_parts_n1_kernel`)."""
    dev = x.device
    x = _aligned16(x)
    ln_bias = _aligned16(norm[1]) if norm is not None and len(norm) == 3 else None
    g, eps, rscale = kernel_norm  # (:func:`_norm_kernel_args` of ``norm``)
    scale = _aligned16(g) if g is not None else None
    y, mode = _dr_out(x, m, out, act, norm, add_to)
    name, shared = kernel
    launch(name, (ceil_div(lay.slices, DR_WARPS), 1, 1),
           32 * DR_WARPS,
           [(data.data_ptr(), P), (offsets.data_ptr(), P), (x.data_ptr(), P), (y.data_ptr(), P),
            (bias.data_ptr() if bias is not None else 0, P), (mode, I),
            (scale.data_ptr() if scale is not None else 0, P),
            (eps, ctypes.c_float), (rscale, ctypes.c_float), (k, I), (lay.slices, I),
            (ln_bias.data_ptr() if ln_bias is not None else 0, P)],
           torch.cuda.current_stream(dev).cuda_stream, dev.index, shared,
           pdl=PDL_SPMM and getattr(_static, "on", False))
    return y


def parts_nt_window(k: int, nt: int, limit: int | None = None) -> int:
    """The columns of X that ``delta_rows_parts_<dtype>_nt<NT>`` stages for a parts-layout weight of ``k`` columns: all
    of K (rounded up to 8) while ``NT x 2`` bytes a column fit :data:`DR_NT_STAGE_MAX` and ``limit`` (the kernel's
    dynamic shared memory on the device, :func:`dynamic_shared_limit`; None: no device limit), else 0 (X read from
    global memory: slower, the same sums)."""
    w = ceil_div(k, 8) * 8
    return w if w * nt * 2 <= _stage_cap(limit) else 0


def _parts_nt_limit(dtype: torch.dtype, nt: int, coded: bool, device: torch.device) -> int | None:
    """:func:`dynamic_shared_limit` of ``delta_rows_parts_<dtype>_nt<NT>[c]`` on ``device``."""
    return dynamic_shared_limit(device, f"delta_rows_parts_{_dtype_suffix(dtype)}_nt{nt}{'c' if coded else ''}")


#: the most bytes of X a split-layout multi-token block stages (``NT x 2`` a column: 3072 columns at NT = 8, the
#: encoder's ``delta_rows.WINDOW_MAX``; 6144 at 4, 12288 at 2); a block whose window is wider reads X from global
#: memory.  (24 KB until session 34, and 1536 columns at NT = 2, 4: OPT-30B's blocks, up to 3072 wide, read X from
#: global memory: batch 2 ran at 0.91x of dense, 2.05x staged; session 34, call F.)
DR_NT_WINDOW_BYTES = 48 * 1024
#: the attribute of a split-layout weight's offsets tensor under which :func:`split_nt_window` remembers its widest
#: block window, ``{(slices, splits): columns}``
_WINDOW_ATTR = "_flash_llm_nt_windows"


def split_nt_window(offsets: torch.Tensor, slices: int, splits: int, nt: int) -> int:
    """The columns of X that ``delta_rows_spmm_<dtype>_nt<NT>`` stages (its dynamic shared memory) for a split-layout
    weight: the widest block window of the weight (``delta_rows.block_window_max``), capped at
    :data:`DR_NT_WINDOW_BYTES`.  Read from ``offsets`` once per weight (a device sync) and remembered on the tensor
    object itself; while a CUDA graph is being captured and the weight is not known yet, the cap itself.  The kernel
    checks every block's window against it, so a wrong value costs speed, never a result.

    (Until session 63 the value was remembered by the tensor's address and size, so a weight allocated where a freed
    one of the same size and split count had lived took the old weight's window: on OPT-30B's fc2 (K = 28672), after
    o's (K = 7168: the same offsets' size), most blocks read X from global memory, 348 us at 8 tokens against 125.)"""
    from ..formats.delta_rows import block_window_max

    cap = DR_NT_WINDOW_BYTES // (2 * nt) // 8 * 8
    memo = getattr(offsets, _WINDOW_ATTR, None)
    widest = memo.get((slices, splits)) if memo is not None else None
    if widest is None:
        if offsets.is_cuda and torch.cuda.is_current_stream_capturing():
            return cap
        win = offsets[slices + 1: slices + 1 + 2 * slices * splits].view(slices, splits, 2)
        widest = block_window_max(win)
        if memo is None:
            memo = {}
            setattr(offsets, _WINDOW_ATTR, memo)
        memo[(slices, splits)] = widest
    return min(ceil_div(widest, 8) * 8, cap)


def dr_nt_atomic_ok(splits: int) -> bool:
    """Whether DeltaRows' multi-token kernel of a split-layout weight of ``splits`` splits sums them by atomics
    (``delta_rows_spmm_<dtype>_nt<NT>a``): :data:`DR_NT_ATOMIC` on and at least :data:`DR_NT_ATOMIC_MIN_SPLITS` (and
    2) splits."""
    return bool(DR_NT_ATOMIC) and splits >= max(2, DR_NT_ATOMIC_MIN_SPLITS)


def _delta_rows_multi(x, data, offsets, m, k, bias, out, act, add_to, norm=None, rscale=1.0) -> torch.Tensor:
    """2 <= N <= 8 tokens on a DeltaRows weight: ``delta_rows_spmm_<dtype>_nt<NT>`` (NT = 2, 4 or 8: N rounded up;
    its X window :func:`split_nt_window`) stores each split's partials, ``delta_rows_reduce_<dtype>`` sums
    them in split order with the epilogue; on the parts layout (one split) ``delta_rows_parts_<dtype>_nt<NT>``
    applies the epilogue and writes ``y`` itself, and at 2 tokens an RMSNorm ``norm`` too (:func:`dr_nt_norm_ok`; X and
    its weight on 16 bytes: ``norm`` is then the kernels' weight and eps, :func:`_norm_kernel_args`, and ``rscale``
    its factor's scale)."""
    from ..formats.delta_rows import layout

    n = x.shape[0]
    dev = x.device
    x = x.contiguous()
    lay = layout(m, offsets.numel(), data.numel())
    slices, s = lay.slices, lay.splits
    nt = 2 if n <= 2 else 4 if n <= 4 else 8
    y, mode = _dr_out(x, m, out, act, norm, add_to)
    stream = torch.cuda.current_stream(dev).cuda_stream
    suffix = _dtype_suffix(x.dtype)
    coded = "c" if lay.coded else ""  # (coded values: their kernels; the reduction after them is the plain one)
    pdl = PDL_SPMM and getattr(_static, "on", False)
    limit = _parts_nt_limit(x.dtype, nt, lay.coded, dev) if lay.parts > 1 and not (lay.coded and n > 4) else None
    if norm is not None and not (dr_nt_norm_ok(n, k, lay.parts, norm, limit) and x.data_ptr() % 16 == 0
                                 and norm[0].data_ptr() % 16 == 0):
        raise ValueError(f"norm inside the multi-token kernel needs 2 tokens on the parts layout with 16-byte rows "
                         f"(n={n}, parts={lay.parts}, k={k})")
    bias_ptr = bias.data_ptr() if bias is not None else 0
    grid = (ceil_div(slices, DR_WARPS), s, 1)

    def walk_args(sums_ptr, wmax):  # DR_NT_ARGS: the kernels' leading arguments, ``sums_ptr`` the fp32 partials or sums
        return [(data.data_ptr(), P), (offsets.data_ptr(), P), (x.data_ptr(), P), (sums_ptr, P), (s, I), (n, I),
                (k, I), (m, I), (slices, I), (lay.parts, I), (wmax, I)]

    if coded and lay.parts > 1 and n > 4:  # (no parts _nt8c, spmm.cu): tokens 0-3, then the rest; each token's sums
        # are its own, in the same order, so the same bits
        for i, j in ((0, 4), (4, n)):
            _delta_rows_multi(x[i:j], data, offsets, m, k, bias, None if add_to is not None else y[i:j], act,
                              y[i:j] if add_to is not None else None)
        return y
    if lay.parts > 1:  # one split and one window, all of K, staged in dynamic shared memory where it fits; the
        # kernel applies the epilogue and writes y itself (no partials, no reduction)
        wmax = parts_nt_window(k, nt, limit)  # (within the device's shared memory: else 0, X from global memory)
        launch(f"delta_rows_parts_{suffix}_nt{nt}{coded}", grid, 32 * DR_WARPS,
               walk_args(0, wmax) + [(y.data_ptr(), P), (bias_ptr, P), (mode, I),
                                     (norm[0].data_ptr() if norm is not None else 0, P),
                                     (float(norm[1]) if norm is not None else 0.0, ctypes.c_float),
                                     (rscale, ctypes.c_float)],
               stream, dev.index, wmax * nt * 2, pdl=pdl and norm is None)  # (DR_NT_NORM: why not programmatic)
        return y
    # the split layout: partials, then the reduction; the weight's widest block window staged in dynamic shared
    # memory
    wmax = split_nt_window(offsets, slices, s, nt)
    shared = 2 * nt * wmax
    if dr_nt_atomic_ok(s):  # the splits summed by atomics, the last warp of a slice writes y (no reduction)
        sums = _scratch.get(dev, stream, n * slices * 32, torch.float32)
        tickets = _scratch.get_tickets(dev, stream, slices)
        launch(f"delta_rows_spmm_{suffix}_nt{nt}a{coded}", grid, 32 * DR_WARPS,
               walk_args(sums.data_ptr(), wmax) + [(y.data_ptr(), P), (bias_ptr, P), (mode, I),
                                                   (tickets.data_ptr(), P)], stream, dev.index, shared, pdl=pdl)
        return y
    ws = torch.empty(s * n * m, dtype=torch.float32, device=dev)
    launch(f"delta_rows_spmm_{suffix}_nt{nt}{coded}", grid, 32 * DR_WARPS, walk_args(ws.data_ptr(), wmax), stream,
           dev.index, shared, pdl=pdl)
    _dr_reduce(ws, y, bias, s, n, m, mode, stream, dev, pdl)
    return y


#: cuBLAS settings (``torch.backends.cuda.matmul``) that let a fp16 / bf16 product lose more than fp32 accumulation
#: does: reduced-precision split-K reductions (PyTorch's default: on) and fp16 accumulation (off by default)
_LOSSY_CUBLAS = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction",
                 "allow_fp16_accumulation")


@contextlib.contextmanager
def _fp32_reductions():
    """cuBLAS with every :data:`_LOSSY_CUBLAS` setting off inside, the caller's settings (split-K flags included)
    restored after.  The expansion's GEMM runs so: with reduced-precision reductions a fp16 product's split-K partial
    sums are added in fp16 and overflow where the result does not (session 77's fuzzer, H100: -inf for -20415, Infs of
    the wrong sign, 4-5 ulps at K = 65535), which the sparse kernels' fp32 sums never do.  (The settings are global: a
    product another thread runs meanwhile gets them too, no less exact.)"""
    mm = torch.backends.cuda.matmul
    saved = []
    for name in _LOSSY_CUBLAS:
        try:
            value = getattr(mm, name)
        except AttributeError:  # (a PyTorch without this setting)
            continue
        try:
            value = (value, getattr(mm, name + "_split_k"))
        except AttributeError:
            pass
        saved.append((name, value))
    try:
        for name, _ in saved:
            setattr(mm, name, False)
        yield
    finally:
        for name, value in saved:
            setattr(mm, name, value)


def _expand_and_gemm(x, data, offsets, fmt, m, k, bias, out):
    """The large-N path: expand the whole weight into a scratch buffer and call cuBLAS, its sums in fp32
    (:func:`_fp32_reductions`).  (Expanding in row chunks small enough to stay in L2 was measured 2.5-3x slower on an
    H200: benchmarks/RESULTS.md.)"""
    # (a fresh buffer from PyTorch's caching allocator, which orders its reuse across streams and graphs)
    w = decode_dense(fmt, data, offsets, m, k, x.dtype)
    with _fp32_reductions():
        # The bias through F.linear (cuBLASLt's bias epilogue), as PyTorch's dense layer runs it.  Session 81 added it
        # as the GEMM's C matrix instead (its fuzzer: BitmapTiles bf16 2 x 513, N = 1000, 6 ulps where the product
        # cancels the bias); on an H100 (session 83, benchmarks/diag/bias_settings.py) that rounded the product
        # before the bias far more often: 1395 against 8 ulps (fp16 8 x 1024, N = 600), Infs where a product beyond
        # fp16's range is brought back by the bias (the fuzzer's seeds 56585238965243, 71973541607250), and 2-15 %
        # slower.  The cuBLAS settings made no difference there.
        r = torch.nn.functional.linear(x, w, bias)
        return r if out is None else out.copy_(r)


#: fp16 RMSNorm weights prepared by :func:`rms_kernel_weight`: weight -> (its version counter then, fusable, the scaled
#: copy or None for the weight itself, the factor's scale).  (The weight itself is never kept as a value: it would keep
#: its own key alive.)
_RMS_FP16_CHECKED = WeakIdKeyDictionary()


def rms_kernel_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float] | None:
    """The RMSNorm weight the kernels multiply X's columns by, for a norm of weight ``weight [K]`` inside the kernels
    on ``dtype`` values, and the power of two their token's factor is multiplied by; None where the norm must run as
    a separate operation.

    Inside, the kernels multiply X's columns by the weight first, rounded to the dtype once, and the token's factor
    ``rsqrt(mean(x^2) + eps)`` multiplies the sums last (``spmm_cuda``).  In fp16 that product overflows where
    ``|x g| > 65504``, though the normalized product the reference rounds is finite (session 78's fuzzer:
    Tiled-CSL's ``_n1rs`` returned inf for -15.3).  No finite fp16 ``x`` overflows it while every ``|g| <= 1``: such
    weights are taken as they are (scale 1).  A weight whose largest magnitude lies in ``(2^(e-1), 2^e]`` (``e >=
    1``) is taken as the copy ``g 2^-e`` (exact: a power of two; only entries below 2^-14 lose bits, as subnormals)
    with the scale ``2^e``, which restores the product to rounding.  A weight with NaN or inf runs separately (the
    reference's NaN / inf).  bf16 shares fp32's range: there the product overflows only where ``x^2`` does, and the
    reference's norm with it, so bf16 weights are always taken as they are.

    The fp16 check reads ``weight`` once (a device sync); it and the copy are kept per tensor and version counter (an
    in-place change is seen at the next call; a CUDA graph captured with a copy keeps reading that copy).  Inside a
    capture an unchecked weight is not fused (the engine's warm-up steps before each capture check its norms)."""
    if dtype != torch.float16:
        return weight, 1.0
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor counts no versions: checked once
        version = None
    seen = _RMS_FP16_CHECKED.get(weight)
    if seen is None or seen[0] != version:
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # (no sync inside a capture: the separate norm is exact)
        seen = (version, True, None, 1.0)
        if weight.numel():
            top = float(weight.detach().abs().amax())
            if not math.isfinite(top):
                seen = (version, False, None, 1.0)
            elif top > 1:
                mant, e = math.frexp(top)  # top = mant 2^e, mant in [0.5, 1): top <= 2^e, and < 2^(e - 1) unless
                e -= mant == 0.5           # a power of two
                seen = (version, True, (weight.detach() * 2.0 ** -e).contiguous(), float(2 ** e))
        _RMS_FP16_CHECKED[weight] = seen
    if not seen[1]:
        return None
    return (weight if seen[2] is None else seen[2]), seen[3]


def rms_fusable(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether an RMSNorm of weight ``weight [K]`` may run inside the kernels for ``dtype`` values
    (:func:`rms_kernel_weight`: every finite weight once checked, in fp16 above 1 through a scaled copy)."""
    return rms_kernel_weight(weight, dtype) is not None


def _norm_kernel_args(norm: tuple | None, dtype: torch.dtype) -> tuple[torch.Tensor | None, float, float]:
    """``spmm_cuda``'s ``norm`` as the kernels take it: (the weight they read, eps, the scale of the RMSNorm's token
    factor); ``(None, 0.0, 1.0)`` without a norm.  An RMSNorm's weight was checked by :func:`rms_kernel_weight` when
    ``spmm_cuda`` began (a cached answer here)."""
    if norm is None:
        return None, 0.0, 1.0
    if len(norm) == 3:  # LayerNorm: normalized before its weight, nothing to scale
        return norm[0], float(norm[2]), 1.0
    kw = rms_kernel_weight(norm[0], dtype)
    if kw is None:  # (spmm_cuda sent these to _unfused)
        raise RuntimeError("an RMSNorm weight the kernels cannot take reached a kernel launch")
    return kw[0], float(norm[1]), kw[1]


def spmm_cuda(x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int, k: int,
              bias: torch.Tensor | None, splits: int | None = None, force_sparse: bool = False,
              out: torch.Tensor | None = None, ways: int | None = None, act: str | None = None,
              norm: tuple | None = None, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``x [N, K]`` (CUDA, fp16/bf16) times the compressed ``W [m, k]`` transposed -> ``[N, m]``.

    ``splits`` overrides the split-K heuristic, ``force_sparse`` the large-N dispatch, ``ways`` (1 or 4) the
    Tiled-CSL reduction's :func:`reduce_ways` (given, the warpgroup kernels' split-K goes to that reduction, not
    :data:`WG_SPREAD`'s), and ``out`` (contiguous, ``[N, m]``, or ``[N, m / 2]`` with ``act``)
    receives the result (tests poison it first).

    Around the product (each computed inside the kernels where :func:`epilogue_fusable` says so for the launch, and
    the norm's weight is contiguous; else by separate operations with the same rounding steps):
    - ``act="silu_mul"`` (``W`` a merged gate / up weight, ``m`` even, no bias): returns
      :func:`~flash_llm.reference.silu_mul_halves` of the product, ``[N, m / 2]``.
    - ``act="relu"``: ``relu`` of the product (+ bias), ``[N, m]`` (inside the kernel: DeltaRows at N = 1).
    - ``norm=(weight [K], eps)``: the product of :func:`~flash_llm.reference.rms_norm` ``(x, weight, eps)`` instead
      of ``x``; ``norm=(weight [K], bias [K] or None, eps)``: of :func:`~flash_llm.reference.layer_norm` (inside the
      kernel: DeltaRows at N = 1, where each block takes X's mean and variance and normalizes its window while
      staging it, rounded to the dtype as the separate LayerNorm would).  RMSNorm fused (Tiled-CSL at N = 1 with
      split-K): ``x``'s columns are scaled by ``weight`` in the spmm and the token's factor ``rsqrt(mean(x^2) +
      eps)`` (its sum of squares taken by the spmm, per split) multiplies the sums in the reduction: the same to
      rounding, not bit for bit; in fp16 a weight above 1 through a copy scaled by a power of two
      (:func:`rms_kernel_weight`).
    - ``add_to`` (``[N, m]``, contiguous, the dtype of ``x``): the product (+ bias), rounded, is added into it in
      place (the residual add of a layer); ``add_to`` is returned.  Not with ``act``, ``norm`` or ``out``.
    """
    if ways not in (None, 1, 4):
        raise ValueError(f"ways must be 1 or 4, got {ways!r}")
    if act not in (None, "silu_mul", "relu"):
        raise ValueError(f"act must be None, 'silu_mul' or 'relu', got {act!r}")
    if act == "silu_mul" and (m % 2 or bias is not None):
        raise ValueError(f"act='silu_mul' needs an even m and no bias (m={m}, bias given: {bias is not None})")
    if norm is not None:
        if not isinstance(norm, tuple) or len(norm) not in (2, 3):
            raise ValueError("norm must be (weight, eps) for RMSNorm or (weight, bias, eps) for LayerNorm")
        for t, what in ((norm[0], "weight"), (norm[1] if len(norm) == 3 else None, "bias")):
            if t is not None and (t.shape != (k,) or t.dtype != x.dtype or t.device != x.device):
                raise ValueError(f"norm's {what} must be [{k}] in {x.dtype} on {x.device}, got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
    if add_to is not None:
        if act is not None or norm is not None or out is not None:
            raise ValueError("add_to goes with none of act, norm and out")
    for t, what, cols in ((add_to, "add_to", m), (out, "out", m // 2 if act == "silu_mul" else m)):
        if t is not None and (t.shape != (x.shape[0], cols) or t.dtype != x.dtype or not t.is_contiguous()
                              or t.device != x.device):
            raise ValueError(f"{what} must be a contiguous {x.dtype} tensor of shape {(x.shape[0], cols)} on "
                             f"{x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    if norm is not None and len(norm) == 2 and not rms_fusable(norm[0], x.dtype):
        return _unfused(x, data, offsets, fmt, m, k, bias, splits, force_sparse, out, ways, act, norm, add_to)
    if fmt == DELTA_ROWS:
        return _delta_rows_cuda(x, data, offsets, m, k, bias, out, act, norm, add_to)
    n = x.shape[0]
    dev = x.device
    density = _density(fmt, data, m, k)
    extra = act is not None or norm is not None or add_to is not None
    if act == "relu" or (norm is not None and len(norm) == 3):  # (DeltaRows' kernel only)
        return _unfused(x, data, offsets, fmt, m, k, bias, splits, force_sparse, out, ways, act, norm, add_to)
    g, eps, rscale = _norm_kernel_args(norm, x.dtype)  # (an RMSNorm's, or none)
    x = x.contiguous()
    vec = int(k % 8 == 0 and x.data_ptr() % 16 == 0)  # (Tiled-CSL's warpgroup kernels need X's rows on 16 bytes)
    if n == 0 or (not force_sparse and not dispatches_sparse(n, fmt, data, m, k, dev.index, bool(vec))):
        if extra:
            return _unfused(x, data, offsets, fmt, m, k, bias, splits, force_sparse, out, ways, act, norm, add_to)
        if n:
            return _expand_and_gemm(x, data, offsets, fmt, m, k, bias, out)
        return torch.empty(0, m, dtype=x.dtype, device=dev) if out is None else out
    name, wg, shared = kernel_config(fmt, x.dtype, n, bool(vec), dev.index, density, m * k)
    threads = block_threads(name)
    p = plan(m, k, n, density, sm_count(dev.index), blocks_per_sm(name, dev.index, threads, shared), splits, fmt,
             wg)
    if extra and not (_epilogue_ok(fmt, name, shared, p, m, bool(vec), act, norm is not None, add_to is not None)
                      and (g is None or (g.is_contiguous() and g.data_ptr() % 4 == 0))):
        return _unfused(x, data, offsets, fmt, m, k, bias, splits, force_sparse, out, ways, act, norm, add_to)
    m_out = m // 2 if act else m
    y = add_to if add_to is not None else torch.empty(n, m_out, dtype=x.dtype, device=dev) if out is None else out
    bw = fmt == BITMAP and shared > 0  # the bitmap warpgroup kernel
    if bw:  # X' in the fragments' column order, padded to whole 64-column tiles
        x, vec = fragment_columns(x), 1
    ws_ptr = tk_ptr = 0
    stream = torch.cuda.current_stream(dev).cuda_stream
    blocks = p.row_blocks * p.n_chunks  # blocks along M and N
    # with split-K, one fp32 partial tile per 64 weight rows and 8 nt tokens (the kernels of N > 32: 32 tokens)
    chunks = ceil_div(n, 8 * p.nt)
    tiles = ceil_div(m, ROWS_PER_BLOCK) * chunks
    bias_ptr = bias.data_ptr() if bias is not None else 0
    if p.splits > 1 and N1_FUSED and fmt == TILED_CSL and name.endswith("_n1"):
        _launch_n1_fused(x, data, offsets, m, k, bias_ptr, y, p, blocks, act, norm, add_to, stream, dev, vec)
        return y
    if ways is None and norm is None and add_to is None and nt_atomic_ok(fmt, name, p):
        _launch_nt_atomic(x, data, offsets, m, k, n, bias_ptr, y, p, blocks, act, stream, dev, vec, name)
        return y
    # the ``_wg<NB>x<R>r`` kernel sums its split-K itself (two counters per row group), else splitk_reduce, below
    spread = ways is None and _wg_spread_ok(fmt, name, p, m, act, blocks, threads, shared, dev)
    if p.splits > 1:
        # (norm: then one sum of squares of X per split, from the n1s kernel to the reduction)
        ws = torch.empty(p.splits * tiles * ROWS_PER_BLOCK * 8 * p.nt + (p.splits if norm is not None else 0),
                         dtype=torch.float32, device=dev)
        ws_ptr = ws.data_ptr()
        if spread:
            tk_ptr = _scratch.get_tickets(dev, stream, 2 * blocks).data_ptr()
        elif fmt == BITMAP and not bw:  # the last block of a row group sums the partials; else splitk_reduce, below
            tk_ptr = _scratch.get_tickets(dev, stream, tiles).data_ptr()
    args = _spmm_args(data, offsets, x, y.data_ptr(), bias_ptr, ws_ptr, tk_ptr, m, k, n, p, vec)
    if norm is not None:  # tiled_csl_spmm_<dtype>_n1s: X's columns scaled by the norm's weight
        name += "s"
        args.append((g.data_ptr(), P))
    if spread:
        name += "r"
        args.append((_RED_SILU if act else 0, I))
    launch(name, (blocks, p.splits, 1), threads, args, stream, dev.index, shared,
           pdl=fmt == TILED_CSL and PDL_SPMM and getattr(_static, "on", False))
    if p.splits > 1 and (fmt == TILED_CSL or bw) and not spread:
        w = ways or reduce_ways(tiles, p.nt, sm_count(dev.index))
        # Programmatic launch (the reduction's blocks wait resident for the spmm; _pdl_reduce).  H200, session 7:
        # Llama-3-8B decode at 80 % 1.1-1.3 % faster per token at N <= 8; at N = 9-16 (_nt2) since session 23, whose
        # blocks let it launch only once their product is done, so its blocks take no room from the spmm's waves.
        mode = (("rms_" if norm is not None else "") + ("silu_" if act else "")
                + ("resid_" if add_to is not None else ""))
        launch(f"splitk_reduce_{mode}{_dtype_suffix(x.dtype)}_nt{p.nt}",
               (tiles // 2 if act else tiles, w * p.nt, 1), THREADS,
               [(ws_ptr, P), (y.data_ptr(), P), (bias_ptr, P), (m_out, I), (n, I), (p.splits, I), (tiles, I),
                (chunks, I), (w, I), (k, I), (eps, ctypes.c_float), (rscale, ctypes.c_float)],
               stream, dev.index, pdl=_pdl_reduce(p.nt, n, name))
    return y


def _spmm_args(data, offsets, x, y_ptr, bias_ptr, ws_ptr, tk_ptr, m, k, n, p, vec) -> list:
    """The spmm kernels' leading arguments (``SPMM_ARGS`` in spmm.cu)."""
    return [(data.data_ptr(), P), (offsets.data_ptr(), P), (x.data_ptr(), P), (y_ptr, P), (bias_ptr, P),
            (ws_ptr, P), (tk_ptr, P), (m, I), (k, I), (n, I), (x.shape[1], I), (ceil_div(m, STRIP_M), I),
            (ceil_div(k, STRIP_K), I), (p.splits, I), (p.kt_per_split, I), (p.n_chunks, I), (vec, I)]


def _launch_n1_fused(x, data, offsets, m, k, bias_ptr, y, p, blocks, act, norm, add_to, stream, dev, vec) -> None:
    """N = 1 with split-K in one launch (:data:`N1_FUSED`): ``tiled_csl_spmm_<dtype>_n1r`` (``_n1rs`` with ``norm``),
    whose last block per row group (of gate and up rows together with ``act``) sums the splits into ``y``."""
    ws = torch.empty(p.splits * blocks * (ROWS_PER_BLOCK + 1), dtype=torch.float32, device=x.device)
    tickets = _scratch.get_tickets(x.device, stream, blocks)
    mode = (_RED_SILU if act else 0) | (_RED_RMS if norm is not None else 0) | (_RED_RESID if add_to is not None else 0)
    name = f"tiled_csl_spmm_{_dtype_suffix(x.dtype)}_n1r" + ("s" if norm is not None else "")
    # (N1_EVEN: kt_per_split 0, the kernel shares the tiles evenly among p.splits)
    args = _spmm_args(data, offsets, x, y.data_ptr(), bias_ptr, ws.data_ptr(), tickets.data_ptr(), m, k, 1,
                      dataclasses.replace(p, kt_per_split=0) if N1_EVEN else p, vec)
    g, eps, rscale = _norm_kernel_args(norm, x.dtype)
    args += [(g.data_ptr() if g is not None else 0, P), (mode, I), (eps, ctypes.c_float), (rscale, ctypes.c_float)]
    launch(name, (blocks, p.splits, 1), 32, args, stream, dev.index, 0,
           pdl=PDL_SPMM and getattr(_static, "on", False))


def nt_atomic_ok(fmt: int, name: str, p: LaunchPlan) -> bool:
    """Whether :func:`spmm_cuda` sums the split-K of kernel ``name`` under plan ``p`` by atomics (``<name>a``): a
    one-warp Tiled-CSL kernel of at most :data:`NT_ATOMIC` 8-token tiles, one block along N, at least
    :data:`NT_ATOMIC_MIN_SPLITS` (and 2) splits.  (Not with ``ways`` given, a norm or a residual add: the caller.)"""
    return (fmt == TILED_CSL and name[-4:] in ("_nt1", "_nt2") and p.nt <= NT_ATOMIC and p.n_chunks == 1
            and p.splits >= max(2, NT_ATOMIC_MIN_SPLITS))


def _launch_nt_atomic(x, data, offsets, m, k, n, bias_ptr, y, p, blocks, act, stream, dev, vec, name) -> None:
    """The one-warp kernel ``name`` (``_nt1`` / ``_nt2``) with its split-K summed by atomics (:data:`NT_ATOMIC`):
    ``<name>a`` adds each block's accumulators into zeroed fp32 sums (``[row block][512 nt]``), and the last block of
    each row group (of gate and up rows together with ``act``) writes ``y`` and zeroes its sums again."""
    sums = _scratch.get(dev, stream, blocks * ROWS_PER_BLOCK * 8 * p.nt, torch.float32)
    tickets = _scratch.get_tickets(dev, stream, blocks)
    args = _spmm_args(data, offsets, x, y.data_ptr(), bias_ptr, sums.data_ptr(), tickets.data_ptr(), m, k, n, p, vec)
    args.append((_RED_SILU if act else 0, I))
    launch(name + "a", (blocks, p.splits, 1), 32, args, stream, dev.index, 0,
           pdl=PDL_SPMM and getattr(_static, "on", False))


def _wg_spread_ok(fmt: int, name: str, p: LaunchPlan, m: int, act, blocks: int, threads: int, shared: int,
                  dev: torch.device) -> bool:
    """Whether :func:`spmm_cuda` sums the split-K of Tiled-CSL warpgroup kernel ``name`` in its own launch
    (:data:`WG_SPREAD`): the blocks of a row group wait for each other there, so only when the whole grid is resident
    at once (``blocks x splits`` within the SMs' room for the ``r`` kernel) and, with SiLU x up, when the up rows
    start on a block (``m / 2`` a multiple of the block's rows)."""
    if not (WG_SPREAD and p.splits > 1 and fmt == TILED_CSL and "_wg" in name):
        return False
    if act is not None and (m // 2) % p.block_rows:
        return False
    return blocks * p.splits <= sm_count(dev.index) * blocks_per_sm(name + "r", dev.index, threads, shared)


#: the epilogue bits of the split-K reductions (``RED_*`` in spmm.cu)
_RED_SILU, _RED_RMS, _RED_RESID = 1, 2, 4


def _pdl_reduce(nt: int, n: int, name: str) -> bool:
    """Whether the split-K reduction after kernel ``name`` (``nt`` 8-token tiles per partial, ``n`` tokens) is
    launched programmatically (:data:`PDL_REDUCE`)."""
    if PDL_REDUCE == "all":
        return True
    if PDL_REDUCE not in ("nt1", "wg"):
        return False
    return nt == 1 or (PDL_REDUCE == "wg" and ((n > 32 and "_wg" in name) or name.endswith("_nt2")))


def epilogue_fusable(fmt: int, data: torch.Tensor, m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                     vec: bool = True, splits: int | None = None, force_sparse: bool = False, act: str | None = None,
                     norm: bool = False, add: bool = False, offsets: torch.Tensor | None = None,
                     layer_norm: bool = False) -> bool:
    """Whether the split-K reduction of ``x [n, k] @ W [m, k]^T`` can do :func:`spmm_cuda`'s elementwise work: the
    sparse kernel runs (not the expansion) with split-K and its reduction is ``splitk_reduce``; SiLU x up (``act``):
    Tiled-CSL or the bitmap warpgroup kernels, ``m`` a multiple of 128; ``norm`` and ``add``: the Tiled-CSL kernel of
    N = 1 (``_n1``) with 16-byte rows (``vec``: ``K % 8 == 0``, ``x`` aligned); ``act="relu"`` and ``layer_norm`` (a
    LayerNorm as the norm): DeltaRows only.  Sparse kernel or expansion is :func:`dispatches_sparse`'s answer for the
    same ``n``, weight and ``vec``, as :func:`spmm_cuda` asks it (``force_sparse``: the sparse kernel, except for
    DeltaRows, which takes no forcing); no tokens: nothing to fuse (False).  Shapes only: no launch, no sync."""
    if n < 1:  # (spmm_cuda launches nothing)
        return False
    if fmt == DELTA_ROWS:  # at N = 1 the kernel does them all; SiLU x up on a weight with paired halves only; at 2
        # tokens (DR_NT_NORM) the multi-token kernels: the bias, the residual add, SiLU x up, and an RMSNorm on the
        # parts layout (dr_nt_norm_ok); the tensor-core kernel (dr_mma_ok): the bias, the residual add and SiLU x up
        # of paired halves in its reduction
        from ..formats.delta_rows import layout, paired_halves

        if not dispatches_sparse(n, fmt, data, m, k, device.index, vec):
            return False
        paired = offsets is not None and paired_halves(m, offsets.numel(), data.numel())
        if dr_mma_ok(n, _dr_parts(m, data)):
            return not (norm or layer_norm) and act != "relu" and (act is None or paired)
        if n == 1:
            return act in (None, "relu") or paired
        if n != 2 or not DR_NT_NORM or offsets is None or act == "relu" or layer_norm or (act and not paired):
            return False
        return not norm or dr_nt_norm_ok(n, k, layout(m, offsets.numel(), data.numel()).parts)
    if act == "relu" or layer_norm:
        return False
    if not force_sparse and not dispatches_sparse(n, fmt, data, m, k, device.index, vec):
        return False
    density = _density(fmt, data, m, k)
    name, wg, shared = kernel_config(fmt, dtype, n, vec, device.index, density, m * k)
    p = plan(m, k, n, density, sm_count(device.index), blocks_per_sm(name, device.index, block_threads(name), shared),
             splits, fmt, wg)
    return _epilogue_ok(fmt, name, shared, p, m, vec, act, norm, add)


def _epilogue_ok(fmt: int, name: str, shared: int, p: LaunchPlan, m: int, vec: bool, act, norm: bool, add: bool
                 ) -> bool:
    """:func:`epilogue_fusable` for the kernel ``name`` (with ``shared`` bytes of dynamic shared memory) and plan
    ``p`` that :func:`spmm_cuda` launches."""
    if p.splits < 2:
        return False
    if (norm or add) and not (fmt == TILED_CSL and name.endswith("_n1") and vec):
        return False
    return act is None or (m % 128 == 0 and (fmt == TILED_CSL or (fmt == BITMAP and shared > 0)))


def _unfused(x, data, offsets, fmt, m, k, bias, splits, force_sparse, out, ways, act, norm, add_to):
    """:func:`spmm_cuda`'s ``act`` / ``norm`` / ``add_to`` as separate operations around the plain product."""
    if norm is not None:
        x = apply_norm(x, norm)
    y = spmm_cuda(x, data, offsets, fmt, m, k, bias, splits, force_sparse, None, ways)
    if act == "silu_mul":
        y = silu_mul_halves(y)
    elif act == "relu":
        y = torch.relu_(y)
    if add_to is not None:
        return add_to.add_(y)
    return _into(y, out)


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return y if out is None else out.copy_(y)


# ------------------------------------------------------------------------------------------------
# decode attention (one query token per sequence, the KV-cache write included): decode_attn_<dtype>_d<D>
# ------------------------------------------------------------------------------------------------
#: slots per block of the decode-attention kernel (``DA_CHUNK`` in spmm.cu) and the most query heads per kv head
DECODE_ATTN_CHUNK, DECODE_ATTN_MAX_REP, DECODE_ATTN_HEADS = 64, 8, 4  # DA_CHUNK, DA_MAX_REP, DA_HEADS
#: up to this many chunks (``DA_CLUSTER_MAX``) the blocks of a (sequence, kv head, head group) run as one thread-block
#: cluster (sm_90) and combine their chunks in shared memory, without partials in global memory, ticket or combine
#: loads (the same bits), while the grid has at most :data:`DECODE_ATTN_CLUSTER_GRID` blocks per SM;
#: ``FLASH_LLM_DECODE_ATTN_CLUSTER=0`` keeps the global combine.  Session 33 (H200, Llama-3-8B heads, RoPE): batch 1
#: 8.7 -> 8.3 us (256 slots, 32 blocks) and 9.1 -> 9.2 (512); batch 16 14.0 -> 20.0 and 23.4 -> 30.9 us (512-1024
#: blocks: a cluster's blocks must be placed together), so large grids keep the global combine
DECODE_ATTN_CLUSTER_MAX = 8
DECODE_ATTN_CLUSTER = _env_flag("FLASH_LLM_DECODE_ATTN_CLUSTER", True)
DECODE_ATTN_CLUSTER_GRID = 1
#: The cluster's chunks combine by push (``decode_attn_<dtype>_d<D>[_c32]_p``, session 76): the blocks of chunks 1 ..
#: store their (o, m, l) into block 0's shared memory, arrive at the cluster barrier and exit; block 0 alone waits
#: there and combines locally (the same bits).  The pull combine (``FLASH_LLM_DECODE_ATTN_PUSH=0``) has every
#: block meet at a cluster barrier, block 0 load the others' rows remotely, and a second barrier keep their shared
#: memory alive until it has.  Session 76's in-step trace (H100, Llama-3-8B bf16 80 %, batch 1, 256 slots): those two
#: barriers and the remote loads were 2.9 of the attention's 7.6 us after its programmatic wait.
DECODE_ATTN_PUSH = _env_flag("FLASH_LLM_DECODE_ATTN_PUSH", True)
#: Chunks of 32 slots (``decode_attn_<dtype>_d<D>_c32``: four threads a key row, half the scores' and the values' work a
#: thread, twice the blocks) where they still combine in one cluster (2-8 chunks: 33-256 slots) within the grid limit
#: above; else chunks of :data:`DECODE_ATTN_CHUNK`.  At batch 1 the 64-slot chunks leave most SMs idle (Llama-3-8B at
#: 256 slots: 32 blocks of 4 warps) and each block's phases are chains of dependent shared-memory reads.  Written in
#: session 57; session 58 (H200, Llama-3-8B bf16 at 80 %, coded DeltaRows, two rounds): batch 2 2.610 -> 2.590 / 2.593
#: ms per token, but batch 1 1.889 -> 1.925 (dense batch 1 4.643 -> 4.616), so from :data:`DECODE_ATTN_C32_MIN_BATCH`
#: sequences only (``FLASH_LLM_DECODE_ATTN_C32_MIN_BATCH``; ``FLASH_LLM_DECODE_ATTN_C32=0`` turns it off).  Batch 1
#: lost only beside the coded DeltaRows kernels (calls 5-7: uncoded fp16 1.937 -> 1.901, bf16 1.939 -> 1.920; coded
#: 1.881 -> 1.917), so an :class:`~flash_llm.engine.Engine` whose projections are dense or uncoded DeltaRows asks for
#: them from batch 1 (``small_chunks_from`` of :func:`decode_attention_cuda`; session 59, fp16 at 80 %: 1.945 -> 1.906).
#: On an H100 too (session 68, bf16 coded at 80 %, batch 1 from 1: 2.042 / 2.044 -> 2.092 / 2.091 ms per token).
DECODE_ATTN_C32 = _env_flag("FLASH_LLM_DECODE_ATTN_C32", True)
DECODE_ATTN_C32_MIN_BATCH = _env_int("FLASH_LLM_DECODE_ATTN_C32_MIN_BATCH", 2, 1)
#: L2 warm-up of the next projections during the decode attention (session 71; built without a GPU, **off** until
#: timed).  At batch 1 a Llama-3-8B layer's attention takes about 8 us of the step's critical path on an H100 (session
#: 68's profile) while reading about 1 MB: DRAM idles there, and the o projection after it (7.5 MB at 80 %, coded) takes
#: 5.9 us for 2.5 us of bytes.  With ``FLASH_LLM_L2_WARM_MB`` > 0 the attention kernel asks L2 (bulk prefetch) for up to
#: that many MB of the projections after it (:func:`l2_warm_ranges`: o's whole weight, then the first part of each walk
#: of gate / up or fc1), so they start from L2.  ``FLASH_LLM_L2_WARM_EARLY=1`` asks before the kernel's programmatic
#: wait (while q/k/v still reads its weight) instead of after it.
L2_WARM_MB = _env_float("FLASH_LLM_L2_WARM_MB", 0, 0.0)
L2_WARM_EARLY = _env_flag("FLASH_LLM_L2_WARM_EARLY", False)
#: ``FLASH_LLM_L2_WARM_SIDE=1``: the warm-up runs as its own small kernel (:func:`l2_warm_cuda`) on a side stream forked
#: where the attention starts (the engine joins it at the step's end), instead of inside the attention kernel, whose
#: blocks wait for their bulk prefetches before they retire (session 71's profile).
L2_WARM_SIDE = _env_flag("FLASH_LLM_L2_WARM_SIDE", False)
#: the most bytes one bulk prefetch of the warm-up asks for; at most L2_WARM_PIECE_MAX (the size reaches the SASS
#: instruction, UBLKPF, as 16 bits of 16-byte units)
L2_WARM_PIECE = 64 * 1024
L2_WARM_PIECE_MAX = 0xFFFF * 16


def _l2_streams(w) -> tuple[list, list]:
    """``(head, walks)`` of a weight (:meth:`flash_llm.formats.SparseFormat.l2_streams`); a dense tensor is one walk."""
    if isinstance(w, torch.Tensor):
        return [], [(w, 0, w.numel() * w.element_size())]
    return w.l2_streams()


def l2_warm_ranges(weights, budget: int, piece: int = L2_WARM_PIECE) -> torch.Tensor | None:
    """The ``(address, bytes)`` table (int64 ``[n, 2]`` on the weights' device) that asks L2 for up to ``budget``
    bytes of ``weights`` (sparse formats or dense tensors), in the order the next kernels read them: each weight's
    head whole, then the same leading share of each of its walks (``l2_streams``), the first weights first, until the
    budget is spent.  Ranges are cut to at most ``piece`` bytes and shrunk inside their array to 16-byte bounds (the
    bulk prefetch's alignment).  None where nothing is asked (no weights, budget 0).  Reads the weights' slice starts
    to the host: build it before a graph capture, not inside one."""
    if piece < 16 or piece % 16 or piece > L2_WARM_PIECE_MAX:
        raise ValueError(f"piece must be a multiple of 16 bytes from 16 to {L2_WARM_PIECE_MAX}, got {piece}")
    out: list[tuple[int, int]] = []
    left = int(budget)
    device = None

    def take(t: torch.Tensor, a: int, b: int) -> int:
        base = t.data_ptr()
        lo, hi = (base + a + 15) & ~15, (base + b) & ~15
        for p in range(lo, hi, piece):
            out.append((p, min(piece, hi - p)))
        return b - a

    for w in weights:
        if w is None or left <= 0:
            continue
        head, walks = _l2_streams(w)
        for t, a, b in head:
            if left > 0:
                left -= take(t, a, min(b, a + left))
                device = t.device
        total = sum(b - a for _, a, b in walks)
        if total <= 0 or left <= 0:
            continue
        share = min(1.0, left / total)
        for t, a, b in walks:
            left -= take(t, a, a + (b - a if share >= 1.0 else int((b - a) * share)))
            device = t.device
    if not out:
        return None
    return torch.tensor(out, dtype=torch.int64).to(device)


def _check_l2_table(l2: torch.Tensor, dev: torch.device) -> None:
    if not (l2.dtype == torch.int64 and l2.dim() == 2 and l2.shape[1] == 2 and l2.is_contiguous()
            and l2.device == dev and l2.data_ptr() % 16 == 0):
        raise ValueError(f"l2 must be a contiguous, 16-byte aligned int64 [n, 2] tensor on {dev} (l2_warm_ranges), "
                         f"got {l2.dtype} {tuple(l2.shape)} on {l2.device}")


def l2_warm_cuda(l2: torch.Tensor) -> None:
    """Ask L2 for the ``(address, bytes)`` ranges of ``l2`` (int64 ``[n, 2]`` from :func:`l2_warm_ranges`, on a CUDA
    device of compute capability 9.0+; nothing is asked before sm_90) with one small kernel on the current stream:
    one warp a block, one range a block, so the prefetches spread over the SMs.  A hint: nothing is written, and
    nothing after it needs to wait for it.  :data:`L2_WARM_SIDE` launches it beside the decode attention."""
    if not isinstance(l2, torch.Tensor) or not l2.is_cuda:
        raise ValueError(f"l2 must be a CUDA tensor, got {type(l2).__name__}"
                         + (f" on {l2.device}" if isinstance(l2, torch.Tensor) else ""))
    dev = l2.device
    _check_l2_table(l2, dev)
    if l2.shape[0] == 0:
        return
    launch("l2_warm_side", (int(l2.shape[0]), 1, 1), 32, [(l2.data_ptr(), P), (int(l2.shape[0]), I)],
           torch.cuda.current_stream(dev).cuda_stream, dev.index)


def _aligned(t: torch.Tensor) -> bool:
    """Rows of ``[B, heads, 1, D]`` readable with 16-byte loads: heads D apart, batch stride a multiple of 8."""
    return t.stride(3) == 1 and t.stride(1) == t.shape[3] and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def decode_attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, mask: torch.Tensor | None, kv_len: int,
                        cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> bool:
    """Whether :func:`decode_attention_cuda` takes these tensors (else the caller computes with PyTorch): CUDA
    (compute capability 8.0+), fp16/bf16, one query token, head size 64 or 128, at least one sequence, kv head and
    query head (none: the launch's grid would be empty), at most 8 query heads per kv head, 16-byte aligned rows,
    contiguous caches, an additive mask of the same dtype or none, and RoPE's ``cos, sin`` ``[B, 1, D]`` (last
    dimension contiguous, the same dtype and strides) or neither."""
    if (cos is None) != (sin is None):
        return False
    if cos is not None and not (cos.dtype == sin.dtype == q.dtype and cos.device == q.device
                                and cos.dim() == 3 and tuple(cos.shape) == (q.shape[0], 1, q.shape[-1])
                                and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(2) == 1):
        return False
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.dim() == 4 and k.dim() == 4):
        return False
    b, h, t, d = q.shape
    hkv = k.shape[1]
    if b == 0 or h == 0 or t != 1 or d not in (64, 128) or hkv == 0 or h % hkv or h // hkv > DECODE_ATTN_MAX_REP:
        return False
    if tuple(k.shape) != (b, hkv, 1, d) or v.shape != k.shape or not all(x.dtype == q.dtype for x in (k, v)):
        return False
    if not all(x.device == q.device for x in (k, v)) or not isinstance(kv_len, int) or isinstance(kv_len, bool):
        return False
    if not all(_aligned(x) for x in (q, k, v)):
        return False
    for c in (k_cache, v_cache):
        if (c.dtype != q.dtype or c.device != q.device or c.dim() != 4 or not c.is_contiguous() or c.shape[0] < b
                or tuple(c.shape[1:]) != (hkv, k_cache.shape[2], d) or c.data_ptr() % 16):
            return False
    if not 0 < kv_len <= min(k_cache.shape[2], 65535 * DECODE_ATTN_CHUNK):  # (the grid's y: chunks of 64 slots; a
        return False  # longer context failed at launch until session 87, CUDA's error naming nothing)
    if mask is not None and (mask.dtype != q.dtype or mask.device != q.device or mask.dim() != 4
                             or mask.shape[0] not in (1, b) or mask.shape[1] != 1 or mask.shape[2] != 1
                             or mask.shape[3] < kv_len or mask.stride(3) != 1):
        return False  # (a mask per head, [B, H, 1, S], is the PyTorch path's: the kernel reads one row a sequence)
    return supported(q.device)[0]


def decode_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None, kv_len: int,
                          scale: float, out: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                          sin: torch.Tensor | None = None, small_chunks_from: int | None = None,
                          l2: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention, with the cache write, in one launch (tensors as :func:`decode_attention_ok`
    accepts them; the caller checks).

    Args:
        q: ``[B, H, 1, D]`` queries; k, v: ``[B, Hkv, 1, D]`` the new token's key and value (``q`` and ``k`` already
            rotated, unless ``cos, sin`` are given).
        k_cache, v_cache: ``[>= B, Hkv, slots, D]``; rows ``0..B-1`` get ``k, v`` at slot ``slot[0]`` (an int64
            device tensor, so a CUDA graph replays it at the slot of the moment; a slot outside ``0..slots-1`` is
            not written).
        mask: additive ``[B or 1, 1, 1, >= kv_len]`` (0 where a query may look, ``-inf`` where not) or ``None``.
        kv_len: the slots attended, ``0..kv_len-1`` (the new key counts at its slot).
        scale: the softmax scale.
        cos, sin: ``[B, 1, D]`` to rotate ``q`` and ``k`` first (RoPE, transformers' convention and rounding: the
            cache receives the bits ``models._fused.rope`` would give), or ``None``: ``q, k`` are used as they are.
        small_chunks_from: the batch from which 32-slot chunks may be taken (:data:`DECODE_ATTN_C32`; ``None``:
            :data:`DECODE_ATTN_C32_MIN_BATCH`).
        l2: an ``(address, bytes)`` table of :func:`l2_warm_ranges` for the kernel to ask L2 for (the next
            projections' weights; before or after its programmatic wait by :data:`L2_WARM_EARLY`), or ``None``.

    Returns ``[B, 1, H * D]`` in the dtype of ``q`` (written into ``out`` if given: contiguous, that shape; tests
    poison it first).
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    if out is not None and (out.shape != (b, 1, h * d) or out.dtype != q.dtype or not out.is_contiguous()
                            or out.device != dev):
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {(b, 1, h * d)} on {dev}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if l2 is not None:
        _check_l2_table(l2, dev)
    groups = ceil_div(h // hkv, DECODE_ATTN_HEADS)  # blocks per (sequence, kv head, chunk): query heads in fours
    chunk = _decode_attn_chunk(b, hkv, groups, kv_len, dev.index, small_chunks_from)
    splits = ceil_div(kv_len, chunk)
    if out is None:
        out = torch.empty(b, 1, h * d, dtype=q.dtype, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    tickets = _scratch.get_tickets(dev, stream, b * hkv * 2)  # each launch resets the ones it used, as the spmm's do
    # (o, m, l) per (sequence, kv head, head group (two places), chunk, head of the group).  Held until after the
    # launch: freed before it, its block could be handed to an allocation the kernel itself uses (session 11: the
    # tickets, allocated on first use, aliased it and the chunks never combined).
    cluster = _decode_attn_cluster(b, hkv, groups, splits, dev.index)
    ws = None
    if splits > 1 and not cluster:
        ws = torch.empty(b * hkv * 2 * splits * DECODE_ATTN_HEADS * (d + 2), dtype=torch.float32, device=dev)
    ws_ptr = 0 if ws is None else ws.data_ptr()
    mask_b = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    L, F32 = ctypes.c_longlong, ctypes.c_float
    args = [(q.data_ptr(), P), (k.data_ptr(), P), (v.data_ptr(), P), (k_cache.data_ptr(), P), (v_cache.data_ptr(), P),
            (slot.data_ptr(), P), (0 if mask is None else mask.data_ptr(), P), (out.data_ptr(), P), (ws_ptr, P),
            (tickets.data_ptr(), P), (0 if cos is None else cos.data_ptr(), P),
            (0 if sin is None else sin.data_ptr(), P), (q.stride(0), L), (k.stride(0), L), (v.stride(0), L),
            (mask_b, L), (0 if cos is None else cos.stride(0), L), (h, I), (hkv, I), (k_cache.shape[2], I),
            (kv_len, I), (splits, I), (float(scale), F32), (int(cluster), I),
            (0 if l2 is None else l2.data_ptr(), P), (0 if l2 is None else l2.shape[0], I), (int(L2_WARM_EARLY), I)]
    name = (f"decode_attn_{_dtype_suffix(q.dtype)}_d{d}{'_c32' if chunk == 32 else ''}"
            f"{'_p' if cluster and DECODE_ATTN_PUSH else ''}")
    launch(name, (b * hkv, splits, groups), 128,
           args, stream, dev.index, pdl=_pdl_attention(b, kv_len), cluster=(1, splits, 1) if cluster else None)
    return out


def _decode_attn_cluster(b: int, hkv: int, groups: int, splits: int, device_index: int) -> bool:
    """Whether the decode attention's ``splits`` chunks combine inside a thread-block cluster: 2 to
    :data:`DECODE_ATTN_CLUSTER_MAX` of them, sm_90, :data:`DECODE_ATTN_CLUSTER`, and a grid of at most
    :data:`DECODE_ATTN_CLUSTER_GRID` blocks an SM."""
    return (2 <= splits <= DECODE_ATTN_CLUSTER_MAX and DECODE_ATTN_CLUSTER and sm90(device_index)
            and b * hkv * splits * groups <= DECODE_ATTN_CLUSTER_GRID * sm_count(device_index))


def _decode_attn_chunk(b: int, hkv: int, groups: int, kv_len: int, device_index: int,
                       from_batch: int | None = None) -> int:
    """The slots a decode-attention block attends: 32 (:data:`DECODE_ATTN_C32`, from ``from_batch`` sequences, by
    default :data:`DECODE_ATTN_C32_MIN_BATCH`) where 32-slot chunks still combine in a cluster, else
    :data:`DECODE_ATTN_CHUNK`."""
    if (DECODE_ATTN_C32 and b >= (DECODE_ATTN_C32_MIN_BATCH if from_batch is None else from_batch)
            and _decode_attn_cluster(b, hkv, groups, ceil_div(kv_len, 32), device_index)):
        return 32
    return DECODE_ATTN_CHUNK


def _pdl_attention(batch: int, kv_len: int) -> bool:
    """Whether the decode attention of ``batch`` sequences over ``kv_len`` slots is launched programmatically: under
    :func:`static_weights`, :data:`PDL_ATTN`, and batch x slots up to :data:`DECODE_ATTN_PDL_MAX_WORK`."""
    return PDL_ATTN and getattr(_static, "on", False) and batch * kv_len <= DECODE_ATTN_PDL_MAX_WORK


__all__ = ["spmm_cuda", "epilogue_fusable", "static_weights", "decode_dense", "plan", "supported", "compile_kernels",
           "KernelBuildError", "decode_attention_cuda", "decode_attention_ok", "l2_warm_ranges",
           "l2_warm_cuda"]
