"""benchmarks/diag/ncu_source_top.py on a hand-made Nsight Compute source table (no GPU, no ncu)."""

from conftest import load_script

nst = load_script("benchmarks/diag/ncu_source_top.py", "ncu_source_top")

CSV = '''==PROF== Connected to process 1
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_barrier","stall_long_sb","stall_long_sb (Not Issued)"
"0x10","LDG.E.128 R4, desc[UR10][R10.64]","10","100","0","0","0"
"0x20","IMAD.MOV.U32 R34, RZ, RZ, R7","600","100","0","590","9"
"0x30","BAR.SYNC.DEFER_BLOCKING 0x0","40","100","30","0","0"
"0x40","LDS R36, [R17+UR8]","350","100","340","1,000","0"
'''


def test_ranks_instructions_by_samples(tmp_path):
    path = tmp_path / "src.csv"
    path.write_text(CSV)
    head, rows = nst.read(str(path))
    assert head[0] == "Address" and len(rows) == 4
    out = nst.top(head, rows, 2, context=1)
    assert out[0] == "4 instructions, 1000 samples"
    assert out[1].startswith(" 60.0%") and "IMAD.MOV.U32" in out[1] and "long_sb 590" in out[1]
    assert "LDG.E.128" in out[2]  # (its context: the load it waits for)
    assert out[3].startswith(" 35.0%") and out[3].index("long_sb 1000") < out[3].index("barrier 340")
    assert len(out) == 5
