"""benchmarks/diag/prefill_graph_memory.py's report of the allocator's pools, over a made-up snapshot (the tool itself
needs a GPU)."""

from conftest import load_script

pgm = load_script("benchmarks/diag/prefill_graph_memory.py", "prefill_graph_memory")

MIB = 2 ** 20


def _block(size, state="active_allocated", where=None):
    frames = [] if where is None else [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                                       {"filename": f"/r/flash_llm/{where[0]}", "line": where[1], "name": where[2]}]
    return {"size": size, "state": state, "frames": frames}


def test_pools_report_sums_pools_and_names_the_largest_blocks():
    snap = {"segments": [
        {"segment_pool_id": (0, 0), "total_size": 3 * 2 ** 30, "allocated_size": 2 ** 30,
         "blocks": [_block(1000 * MIB, where=("models/llama.py", 40, "forward")), _block(5 * MIB, "inactive")]},
        {"segment_pool_id": (0, 2), "total_size": 2 ** 30, "allocated_size": 512 * MIB,
         "blocks": [_block(300 * MIB, where=("kernels/__init__.py", 646, "_delta_rows_to_dense")),
                    _block(200 * MIB), _block(400 * MIB, "inactive")]},
    ]}
    lines = pgm.pools_report(snap, top=2)
    assert lines[0].split() == ["pool", "(0,", "0):", "reserved", "3.00", "allocated", "1.00"]
    assert lines[1].split() == ["pool", "(0,", "2):", "reserved", "1.00", "allocated", "0.50"]
    largest = [ln for ln in lines if "largest" in ln]
    assert len(largest) == 2 and "1000.0 MiB" in largest[0] and "llama.py:40 forward" in largest[0]
    assert "300.0 MiB" in largest[1] and "__init__.py:646 _delta_rows_to_dense" in largest[1]
    pooled = [ln for ln in lines if "in pool" in ln]
    assert [("300.0" in ln, "200.0" in ln) for ln in pooled] == [(True, False), (False, True)]
    assert pooled[1].endswith("?")  # (no frames recorded)
    assert all("inactive" not in ln and "400.0" not in ln and "5.0 MiB" not in ln for ln in lines)
