"""benchmarks/attn_trace.py's summary of the decode attention's phase stamps (the tool itself needs a GPU and a
patched kernel)."""

import torch
from conftest import load_script

attn_trace = load_script("benchmarks/attn_trace.py", "attn_trace")  # (it puts benchmarks/ on sys.path for _timing)


def _stamps(launches=3, blocks=4, ghz=2):
    """Block j of launch i enters at 10000 i + 10 j ns; its phases take 100 (k + 1) ns each (k = 0..5); the last block
    of each launch alone runs the combine, 700 ns; SM j."""
    t = torch.zeros(launches, blocks, 32, dtype=torch.int64)
    for i in range(launches):
        for j in range(blocks):
            at = 10000 * i + 10 * j
            for k in range(7):
                t[i, j, 2 * k], t[i, j, 2 * k + 1] = at, ghz * at
                at += 100 * (k + 1)  # (after stamp 6: unused)
            if j == blocks - 1:
                end = int(t[i, j, 12]) + 700
                t[i, j, 14], t[i, j, 15] = end, ghz * end
            t[i, j, 31] = j
    return t


def test_summary_of_synthetic_stamps():
    r = attn_trace.summarize(_stamps())
    assert r["sms"] == 4 and abs(r["ghz"] - 2) < 1e-9
    # each launch: first entry at 10000 i, last stamp 30 + 2100 + 700 later (the combine of the last block)
    assert r["spans"] == [2830] * 3 and r["gaps"] == [10000 - 2830] * 2 and r["spread"] == [30] * 3
    phases = r["phases"]
    assert list(phases) == attn_trace.PHASES
    for k, name in enumerate(attn_trace.PHASES[:-1]):
        assert phases[name] == (2 * 100 * (k + 1), 2 * 100 * (k + 1))
    assert phases["combine"] == (1400, 1400)  # only the blocks that ran it


def _step_stamps(base=1_000_000):
    """Two launches of one replay (ns after ``base``; cycles 2 ns plus 1000 per SM, so only differences mean time).
    Launch 0, the cluster path, three blocks on SMs 0-2: entries 0 / 100 / 5000, after-wait stamps 3000 / 3050 /
    5020, then 100, 200, 300, 400, 500 ns to stamps 2-6, 600 to the cluster barrier (8), 700 to the combine (7).
    Launch 1, the global combine, two blocks (the third row never ran): entries 9000 / 9010, after-wait 10000 /
    10500, the same 100-500 to stamp 6, and 800 more for the last block's combine."""
    t = torch.zeros(2, 3, 32, dtype=torch.int64)

    def put(i, j, k, ns):
        t[i, j, 2 * k], t[i, j, 2 * k + 1] = base + ns, 2 * (base + ns) + 1000 * j

    for i, (entries, waits, tail) in enumerate([((0, 100, 5000), (3000, 3050, 5020), ((8, 600), (7, 700))),
                                                ((9000, 9010), (10000, 10500), ())]):
        for j, (e, w) in enumerate(zip(entries, waits)):
            put(i, j, 0, e)
            at = w
            put(i, j, 1, at)
            for k in range(2, 7):
                at += 100 * (k - 1)
                put(i, j, k, at)
            for k, dt in tail:
                at += dt
                put(i, j, k, at)
            if i == 1 and j == 1:
                put(i, j, 7, at + 800)
            t[i, j, 24], t[i, j, 25], t[i, j, 31] = 3 - i, 1 - i, j
    return t


def test_step_summary_of_synthetic_stamps(capsys):
    r = attn_trace.summarize_step(_step_stamps())
    l0, l1 = r["layers"]
    # launch 0: release 3000 (block 0), blocks 0 and 1 resident by then (entries 0, 100); the last stamp is block 2's
    # 5020 + 2800
    assert l0 == {"span": 7820, "crit": 4820, "gap": None, "to_release": None, "entry_spread": 5000,
                  "wait_spread": 2020, "skew": 50, "resident": 2, "blocks": 3, "cluster": True, "sms": 3}
    # launch 1: after launch 0's end (7820) 1180 ns to the first entry, 2180 to the release; ends at 10500 + 1500 + 800
    assert l1 == {"span": 3800, "crit": 2800, "gap": 1180, "to_release": 2180, "entry_spread": 10,
                  "wait_spread": 500, "skew": 500, "resident": 2, "blocks": 2, "cluster": False, "sms": 2}
    assert abs(r["ghz"] - 2) < 1e-9  # (the longest block: launch 0's first, 5800 ns)
    ph = r["phases"]
    assert list(ph) == [n for n, *_ in attn_trace.STEP_PHASES]
    assert ph["wait"] == (5, 1490, 2980)  # 3000, 2950, 20, 1000, 1490
    for name, ns in [("q/k published", 100), ("scores", 200), ("softmax", 300), ("values", 400),
                     ("partials / output", 500)]:
        assert ph[name] == (5, ns, 2 * ns)
    assert ph["cluster barrier"] == (3, 600, 1200) and ph["cluster combine"] == (3, 700, 1400)
    assert ph["global combine"] == (1, 800, 1600)  # (not the cluster blocks, whose stamp 7 follows stamp 8)
    attn_trace.report_step(_step_stamps())
    out = capsys.readouterr().out
    assert "2 attention launches, 3 blocks each on 3 SMs, cluster combine" in out
    assert "| 1 | 3.80 | 2.80 | 1.18 | 2.18 | 0.01 | 0.50 | 0.50 (2) |" in out
    assert "| global combine | 1 | 800 | 1600 | 800 |" in out


def test_kernel_alone_summary_skips_blocks_that_did_not_run():
    r = attn_trace.summarize(_step_stamps())
    assert r["spans"] == [7820, 3800] and r["gaps"] == [1180] and r["spread"] == [5000, 10] and r["sms"] == 3
    # combine (stamp 6 to 7): launch 0's blocks 1300 ns (barrier and combine), launch 1's last block 800; in cycles
    assert r["phases"]["combine"] == (2600, (2600 + 1600) / 2)
    assert r["phases"]["wait"] == (2980, (40 + 2980) / 2)  # the last blocks: launch 0's third (20), launch 1's second
