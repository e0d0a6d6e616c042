"""bench/costream.py at toy size without a GPU (``--device cpu``: the same split and join, the GPU's
rows computed here): every share runs, and the joined layers equal the CPU kernel's alone."""

import json

import procs


def test_costream_runs_every_share_and_joins_the_rows_exactly(tmp_path):
    out = tmp_path / "costream.json"
    proc = procs.run_python([str(procs.REPO / "bench" / "costream.py"), "--device", "cpu", "--layer-shapes",
                             "256x128,128x256", "--copies", "2", "--min-time", "0.05", "--fractions", "0,0.5,1",
                             "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads(out.read_text())["by_fraction"]
    assert sorted(rows) == ["0.0", "0.5", "1.0"]
    assert [rows[f]["gpu_share"] for f in ("0.0", "0.5", "1.0")] == [0.0, 0.5, 1.0]
    for row in rows.values():
        for batch in ("1", "16"):
            assert row[batch]["GBps"] > 0 and row[batch]["max_rel_err_vs_first"] < 2e-2
    assert "GPU share" in proc.stdout
