"""benchmarks/sass_loop.py's parsing of cuobjdump output (the tool itself needs cuobjdump, absent in CI)."""


import pytest
from conftest import load_script

sass_loop = load_script("benchmarks/sass_loop.py", "sass_loop")

SASS = """
        Function : other_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   EXIT ;
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDS R2, [R3] ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   SHFL.UP P1, R4, R5, 0x1, RZ ;
        /*0040*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0050*/                   HMMA.16816.F32 R4, R8, R14, R4 ;
        /*0060*/                   IMAD.HI.U32 R6, R7, UR4, R8 ;
        /*0070*/              @!P1 BRA 0x30 ;
        /*0080*/                   EXIT ;
"""


def test_functions_and_main_loop():
    funcs = sass_loop.functions(SASS)
    assert list(funcs) == ["other_kernel", "k"] and len(funcs["k"]) == 9
    loop = sass_loop.main_loop(funcs["k"])  # from the backward branch's target 0x30 to the branch at 0x70
    assert [sass_loop.opcode(t) for t in loop] == ["SHFL", "HMMA", "HMMA", "IMAD", "BRA"]
    with pytest.raises(ValueError, match="no backward branch"):
        sass_loop.main_loop(funcs["other_kernel"])
