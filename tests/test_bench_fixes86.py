"""Session 86 (a hunt of the benchmarks' measurements): ``profile_decode.py`` filed PyTorch's memory-efficient and
flash attention kernels (names with "cutlass") under cuBLAS and the math path's ``cunn_SoftMaxForward`` under
"other", so a profile through scaled_dot_product_attention showed no attention and no layer timeline; and its
``--sdpa`` changed nothing while flash-llm's own decode-attention kernel ran.  ``time_across_n.py --ns`` was read only
after the GPU work had begun (``1,x`` a bare ValueError there; ``0`` and ``-8`` taken)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, load_script

sys.path.insert(0, str(REPO / "benchmarks"))  # (the scripts' neighbour _timing)
try:
    P = load_script("benchmarks/profile_decode.py", "profile_decode_86")
    T = load_script("benchmarks/time_across_n.py", "time_across_n_86")
finally:
    sys.path.remove(str(REPO / "benchmarks"))

MEM_EFFICIENT = ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, "
                 "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)")
FLASH = ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, "
         "cutlass::half_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::half_t> >, false>(pytorch_flash::"
         "Flash_fwd_params)")
SOFTMAX = ("void (anonymous namespace)::cunn_SoftMaxForward<4, c10::Half, float, c10::Half, (anonymous namespace)::"
           "SoftMaxForwardEpilogue>(c10::Half*, c10::Half const*, int)")


@pytest.mark.parametrize("name", [MEM_EFFICIENT, FLASH, SOFTMAX, "decode_attn_f16_d128_p"])
def test_pytorch_attention_kernels_count_as_attention(name):
    assert P.group_of(name) == "attention"


@pytest.mark.parametrize("name", ["nvjet_sm90_hsh_128x8_64x12_2x1_v_bz_TNT", "sm90_xmma_gemm_f16f16_f16f32",
                                  "void cutlass::Kernel<cutlass_80_tensorop_f16_s16816gemm_f16_64x64_64x10_nn_align8>"])
def test_cublas_and_cutlass_gemms_stay_dense_matmul(name):
    assert P.group_of(name) == "dense matmul (cuBLAS)"


def test_a_layer_timeline_through_sdpa_kernels():
    ks, t = [], 0.0
    for _ in range(4):
        ks += [{"name": MEM_EFFICIENT, "start": t, "end": t + 10},
               {"name": "tiled_csl_spmm_f16_nt1a", "start": t + 12, "end": t + 40}]
        t += 50
    assert P.layer_timeline(ks)


@pytest.mark.parametrize("ns", ["1,x", "1,,8,0", "-8", "", "0"])
def test_time_across_n_refuses_bad_ns_before_any_cuda_work(ns, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--ns", ns])
    assert e.value.code == 2 and "--ns" in capsys.readouterr().err


def test_time_across_n_ns_parsed():
    assert T.parse_args(["--ns", "1, 8,16"]).ns == [1, 8, 16]
    assert T.parse_args([]).ns == [1, 8, 16, 32, 64]
