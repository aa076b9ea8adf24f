"""Global loads whose result is used right away, found in the SASS without a GPU (session 70).

    python benchmarks/diag/sass_load_use.py [--arch sm_90] [--kernels NAME,...] [--within 6]

Session 70 found, in Nsight Compute's stall sampling, that ``dr_place`` copied a coded group's steps word out of the
16-byte load's registers right after the load (``d = coded ? v.w : ...``): the copy waited for the load at once, so
the load meant to be a chunk ahead was never in flight, whatever the source's prefetch said (29 % of ``_sr``'s stall
samples).  This script looks for that shape statically: for every global load (``LDG``; not ``LDGSTS``, whose data
goes to shared memory) it counts the instructions, in program order, until the first one that reads one of the
load's destination registers, and lists the loads used within ``--within`` instructions.  A short distance is not
always a stall (the load may be one of the kernel's first, or on a path taken once); a short distance inside a loop
that was written to prefetch is the thing to look at.  Program order only: a use reached by a branch backwards is not
seen, and a register written again before its use ends the search.

Needs ``cuobjdump`` and ``nvdisasm`` (``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``, or on ``PATH``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from sass_loop import cuobjdump  # noqa: E402

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
REG = re.compile(r"\bR(\d+)(\.64)?\b")
# opcodes whose first operand is read, not written
NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "BAR", "BSYNC", "BSSY", "EXIT", "RET", "CALL", "WARPSYNC",
           "MEMBAR", "LDGDEPBAR", "DEPBAR", "ERRBAR", "NOP", "YIELD", "JMP", "BRX", "ATOMS.POPC", "CCTL")
WIDTH = {"128": 4, "64": 2}


def _regs(text: str) -> set[int]:
    out = set()
    for m in REG.finditer(text):
        r = int(m.group(1))
        out.add(r)
        if m.group(2):  # (an address pair)
            out.add(r + 1)
    return out


def parse(sass: str) -> list[tuple[str, str, str]]:
    """``(address, opcode, operands)`` of every instruction of one function's SASS."""
    return [(m.group(1), m.group(3), m.group(4)) for m in LINE.finditer(sass)]


def exposed_loads(instrs: list[tuple[str, str, str]], within: int) -> list[tuple[str, str, int, str]]:
    """``(address, load, distance, user)`` for each ``LDG`` whose destination is read within ``within``
    instructions."""
    found = []
    for i, (addr, op, ops) in enumerate(instrs):
        if not op.startswith("LDG") or op.startswith("LDGSTS") or op.startswith("LDGDEPBAR"):
            continue
        first = ops.split(",")[0].strip()
        m = REG.match(first)
        if not m:
            continue
        width = next((w for k, w in WIDTH.items() if f".{k}" in op), 1)
        dest = set(range(int(m.group(1)), int(m.group(1)) + width))
        for j in range(i + 1, min(len(instrs), i + 1 + within)):
            _, op2, ops2 = instrs[j]
            parts = [p.strip() for p in ops2.split(",")]
            writes = op2.split(".")[0] not in NO_DEST and parts and parts[0].startswith("R")
            reads = _regs(",".join(parts[1:] if writes else parts))
            if reads & dest:
                found.append((addr, f"{op} {ops}", j - i, f"{op2} {ops2}"))
                break
            if writes and _regs(parts[0]) & dest:
                break
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--kernels", default="delta_rows_to_dense_srk,delta_rows_to_dense_pr,delta_rows_parts_bf16_p16_s2c,"
                    "delta_rows_parts_bf16_p4_s2c,delta_rows_spmm_bf16_n1c,delta_rows_spmm_bf16_nt2c")
    ap.add_argument("--within", type=int, default=6)
    ap.add_argument("--context", type=int, default=0, help="print this many instructions around each hit")
    a = ap.parse_args()
    from flash_llm.kernels._build import compile_kernels

    compiled = compile_kernels(a.arch)
    tool = cuobjdump()
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.cubin)
    try:
        for name in [k for k in a.kernels.split(",") if k]:
            sass = subprocess.run([tool, "-sass", "-fun", name, f.name], capture_output=True, text=True).stdout
            instrs = parse(sass)
            if not instrs:
                print(f"{name}: no SASS (not a kernel of this build?)")
                continue
            hits = exposed_loads(instrs, a.within)
            loads = sum(1 for _, op, _ in instrs if op.startswith("LDG") and not op.startswith("LDGSTS"))
            print(f"{name}: {len(instrs)} instructions, {loads} global loads, {len(hits)} used within {a.within}")
            where = {a: i for i, (a, _, _) in enumerate(instrs)}
            for addr, load, dist, user in hits:
                print(f"  /*{addr}*/ {load[:60]:60s} -> +{dist} {user[:60]}")
                i = where[addr]
                for a2, op2, ops2 in instrs[max(0, i - a.context): i + dist + a.context + 1] if a.context else ():
                    print(f"      /*{a2}*/ {op2} {ops2[:80]}")
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
