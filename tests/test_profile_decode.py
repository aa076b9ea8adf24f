"""benchmarks/profile_decode.py's critical-path attribution (the tool itself needs a GPU)."""


import pytest
import torch
from conftest import load_script

profile_decode = load_script("benchmarks/profile_decode.py", "profile_decode")


def _k(start, end):
    return {"name": "k", "start": float(start), "end": float(end)}


def test_critical_times_of_a_chain_with_early_starts_and_gaps():
    """A kernel that starts early (programmatic launch) gets only the time after the one before it ends; a gap goes
    to idle; a kernel inside another's run gets nothing; the times and idle add up to the span."""
    ks = [_k(0, 10), _k(4, 15), _k(15, 18), _k(20, 30), _k(22, 25), _k(29, 40)]
    crit, idle = profile_decode.critical_times(ks)
    assert crit == [10, 5, 3, 10, 0, 10]
    assert idle == 2
    assert sum(crit) + idle == ks[-1]["end"] - ks[0]["start"]


@pytest.mark.parametrize("ks", [[], [{"name": "a", "start": 5.0, "end": 9.0}]])
def test_critical_times_of_no_or_one_kernel(ks):
    crit, idle = profile_decode.critical_times(ks)
    assert crit == [k["end"] - k["start"] for k in ks] and idle == 0


def test_kernel_groups():
    """Each of the library's kernels lands in its group: the atomics' split-K kernels (``_nt1a``) with the sparse
    matmuls, both formats' separate reductions with the split-K reductions."""
    g = profile_decode.group_of
    assert g("tiled_csl_spmm_f16_nt1a") == g("delta_rows_spmm_bf16_nt4") == "sparse matmul"
    assert g("splitk_reduce_silu_f16_nt1") == g("delta_rows_reduce_f16") == "split-K reduce"
    assert g("decode_attn_f16_d128") == "attention" and g("triton_poi_fused_add_0") == "compiled elementwise (Triton)"


def _run(t0, names, step=10.0):
    """One replay starting at t0: kernels of 8 us, each starting 10 us after the one before (programmatic overlap
    shown by the next test's negative gaps)."""
    return [{"name": n, "start": t0 + step * i, "end": t0 + step * i + 8.0} for i, n in enumerate(names)]


def test_split_replays_at_the_host_gaps():
    """Replays are cut at the host's gaps, not by equal counts: a kernel before the loop (its own run, dropped), three
    replays of 4 kernels with 2 us gaps and an early start inside, 300-500 us between replays; every replay keeps its
    own first and last kernel, and the middle one's idle is only its own gaps."""
    names = ["add_slot", "embed", "spmm", "reduce"]
    ks = [{"name": "fill", "start": 0.0, "end": 1.0}]
    for t0 in (400.0, 800.0, 1300.0):
        run = _run(t0, names)
        run[3]["start"] -= 5.0  # starts before the kernel before it ends (programmatic launch)
        ks += run
    ks.sort(key=lambda k: k["start"])
    reps = profile_decode.split_replays(ks, 3)
    assert [[k["name"] for k in r] for r in reps] == [names] * 3
    assert [r[0]["start"] for r in reps] == [400.0, 800.0, 1300.0]
    crit, idle = profile_decode.critical_times(reps[1])
    assert idle == 4.0  # two 2-us gaps; the early start is not idle
    # equal counts (the old split) would have begun the middle replay with the first replay's last kernel
    per = len(ks) // 3
    assert ks[per]["name"] != "add_slot"


def test_split_replays_of_one_replay_and_of_nothing():
    assert profile_decode.split_replays([], 3) == []
    run = _run(100.0, ["a", "b", "c"])
    assert profile_decode.split_replays(run, 1) == [run]
    assert profile_decode.split_replays([{"name": "fill", "start": 0.0, "end": 1.0}] + run, 1) == [run]


def test_layer_timeline_takes_medians_from_each_attention_start():
    ks = []
    t = 0.0
    for layer in range(5):  # attention, o, mlp; o is 2 us late in the middle layer
        late = 2.0 if layer == 2 else 0.0
        ks += [{"name": "decode_attn_f16_d128", "start": t, "end": t + 10},
               {"name": "delta_rows_spmm_f16_n1", "start": t + 1, "end": t + 15 + late},
               {"name": "delta_rows_spmm_f16_n1", "start": t + 5, "end": t + 40 + late}]
        t += 50
    ks.append({"name": "nvjet_lm_head", "start": t, "end": t + 200})  # after the last attention: its own count
    tl = profile_decode.layer_timeline(ks)
    assert [n for n, _, _ in tl] == ["decode_attn_f16_d128", "delta_rows_spmm_f16_n1", "delta_rows_spmm_f16_n1"]
    assert tl[1] == ("delta_rows_spmm_f16_n1", 1.0, 15.0)  # the late layer moves no median
    assert tl[2][2] == 40.0
    assert profile_decode.layer_timeline(ks[:3]) == []


def test_restart_keeps_replayed_steps_inside_the_rope_tables():
    """The tool replays the captured step hundreds of times; :func:`restart` puts cache slot and position back, so a
    Llama's position never passes its RoPE tables' ``max_seq`` rows (session 47: resetting only the slot, the batch-8
    profile indexed the tables out of bounds on the GPU)."""
    from conftest import tiny_hf_model
    from flash_llm.engine import Engine
    from flash_llm.models import from_config

    hm = tiny_hf_model("llama")
    ours = from_config(hm.config, dtype=torch.float32, device="meta")
    ours.load_state_dict(hm.state_dict(), assign=True)
    eng = Engine(ours.eval(), max_batch=2, max_seq=12)
    eng.generate([[5, 6, 7], [1, 2, 3, 4]], 2, eos_token_id=None)
    rows = eng._slots  # (max_seq rounded up)
    assert eng._rope is not None and eng._rope[0].shape[0] == rows
    for _ in range(3):  # three rounds from slot 4 to the cache's end: about 3x the steps the cache holds
        profile_decode.restart(eng, 4)
        assert eng._slot.tolist() == [4] and eng._pos[:2].tolist() == [4, 4]
        for _ in range(rows - 4):
            eng._step(2)
    assert eng._slot.tolist() == [rows] and eng._pos[:2].tolist() == [rows, rows]
    eng._slot.fill_(4)  # the slot alone put back: the next position is past the tables
    with pytest.raises(IndexError):
        eng._step(2)
