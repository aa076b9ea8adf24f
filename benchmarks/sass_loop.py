"""Static SASS counts of the kernels' main loops, without a GPU: compare kernel variants on the dev machine.

    python benchmarks/sass_loop.py [--arch sm_90] [--kernels bitmap_spmm_f16_nt1,...] [--patch P.patch]

Compiles ``flash_llm/kernels/spmm.cu`` (or the tree with ``--patch`` applied, in a temporary copy) through the
package's NVRTC path, disassembles the cubin with ``cuobjdump -sass`` (``pip install nvidia-cuda-cuobjdump``, or on
``PATH``; it needs ``nvidia-cuda-nvdisasm`` too), and for each kernel finds its main loop: the backward branch that closes the last ``HMMA``.  Prints
the loop's instruction count and its mix by opcode (shared-memory, shuffles, popcounts, integer, tensor core).
The count is static (every instruction of the loop body once, the rarely taken refill path included), so it
compares variants of one kernel; it is not a time.  Session 4 used it to count the format-version-3 prototype.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"LDS": "shared load", "STS": "shared store", "LDGSTS": "cp.async", "LDG": "global load",
           "SHFL": "shuffle", "POPC": "popcount", "PRMT": "byte permute", "LOP3": "logic", "IMAD": "int multiply-add",
           "IADD3": "int add", "SHF": "shift", "HMMA": "tensor core", "HGMMA": "warpgroup MMA", "BRA": "branch"}


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # the pip wheel nvidia-cuda-cuobjdump
        import nvidia

        for base in nvidia.__path__:
            hits = glob.glob(os.path.join(base, "**", "bin", "cuobjdump"), recursive=True)
            if hits:  # it runs nvdisasm, from the wheel nvidia-cuda-nvdisasm in the same bin folder
                os.environ["PATH"] = os.path.dirname(hits[0]) + os.pathsep + os.environ.get("PATH", "")
                return hits[0]
    except ImportError:
        pass
    sys.exit("cuobjdump not found: put it on PATH or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def kernel_source(patch: str | None) -> bytes:
    path = os.path.join(ROOT, "flash_llm", "kernels", "spmm.cu")
    if patch is None:
        return open(path, "rb").read()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "flash_llm", "kernels"))
        shutil.copy(path, os.path.join(tmp, "flash_llm", "kernels", "spmm.cu"))
        proc = subprocess.run(["git", "apply", "--include=flash_llm/kernels/spmm.cu", os.path.abspath(patch)], cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{patch} does not apply to spmm.cu: {proc.stderr}")
        return open(os.path.join(tmp, "flash_llm", "kernels", "spmm.cu"), "rb").read()


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """``{kernel: [(address, instruction text), ...]}`` from ``cuobjdump -sass`` output."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def main_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """The instructions from the target of the backward branch closing the last HMMA (or warpgroup HGMMA) up to that
    branch: the first branch after the MMA back to an address at or before it (an inner loop after the MMA, such as
    the warpgroup kernels' scatter of the next tile, is inside the result)."""
    last_mma = max(i for i, (_, t) in enumerate(instrs) if "HMMA" in t or "HGMMA" in t)
    mma_addr = instrs[last_mma][0]
    for addr, text in instrs[last_mma:]:
        m = re.search(r"BRA (?:\S+, )?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= mma_addr:  # a loop that encloses the MMA, not one nested after it
            start = int(m.group(1), 16)
            return [t for a, t in instrs if start <= a <= addr]
    raise ValueError("no backward branch after the last HMMA")


def opcode(text: str) -> str:
    op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    return op.split(".")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--kernels", default="bitmap_spmm_f16_nt1,bitmap_spmm_f16_nt2,bitmap_spmm_f16_nt4,"
                                         "bitmap_spmm_f16_nt8,tiled_csl_spmm_f16_nt1")
    ap.add_argument("--patch", help="a patch of the repository (benchmarks/ab/*.patch): count its spmm.cu instead")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from flash_llm.kernels._build import compile_kernels

    compiled = compile_kernels(a.arch, use_cache=False, source=kernel_source(a.patch))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.cubin)
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    funcs = functions(sass)
    print(f"{a.arch}, {'patch ' + a.patch if a.patch else 'checked-out spmm.cu'}: main-loop SASS instructions")
    print("| kernel | loop | " + " | ".join(CLASSES) + " |")
    print("|---|---|" + "---|" * len(CLASSES))
    for name in a.kernels.split(","):
        if name not in funcs:
            print(f"| {name} | not in the cubin |")
            continue
        loop = main_loop(funcs[name])
        counts = collections.Counter(opcode(t) for t in loop)
        print(f"| {name} | {len(loop)} | " + " | ".join(str(counts.get(c, 0)) for c in CLASSES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
