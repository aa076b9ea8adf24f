"""benchmarks/diag/sass_load_use.py's scan (session 70) on hand-written SASS: no GPU, no cuobjdump."""

from conftest import load_script

slu = load_script("benchmarks/diag/sass_load_use.py", "sass_load_use")

SASS = """
        /*0100*/                   LDG.E.128.CONSTANT R4, desc[UR10][R10.64] ;           /* 0x0 */
        /*0110*/                   ISETP.NE.AND P0, PT, RZ, UR5, PT ;                    /* 0x0 */
        /*0120*/                   IMAD.MOV.U32 R34, RZ, RZ, R7 ;                        /* 0x0 */
        /*0130*/              @!P0 LDG.E.CONSTANT R34, desc[UR10][R24.64] ;              /* 0x0 */
        /*0140*/                   LDGSTS.E.128 [R3], desc[UR10][R8.64] ;                /* 0x0 */
        /*0150*/                   LDG.E.64 R12, desc[UR6][R12.64] ;                     /* 0x0 */
        /*0160*/                   IADD3 R1, R2, R3, RZ ;                                /* 0x0 */
        /*0170*/                   MOV R12, RZ ;                                         /* 0x0 */
        /*0180*/                   STS.64 [R3], R12 ;                                    /* 0x0 */
        /*0190*/                   STG.E [R34.64], R0 ;                                  /* 0x0 */
"""


def test_finds_the_copy_that_waits_for_a_load():
    instrs = slu.parse(SASS)
    assert [op for _, op, _ in instrs][:3] == ["LDG.E.128.CONSTANT", "ISETP.NE.AND", "IMAD.MOV.U32"]
    hits = slu.exposed_loads(instrs, 6)
    # the 16-byte load's R7 read two instructions on; the 4-byte load's R34 read by the store's address (R34.64);
    # the 8-byte load's R12 written again before the store reads it (not a use of the load); LDGSTS not a load here
    assert [(a, d) for a, _, d, _ in hits] == [("0100", 2), ("0130", 6)]
    assert hits[0][3].startswith("IMAD.MOV.U32")
    assert slu.exposed_loads(instrs, 2) == hits[:1]
