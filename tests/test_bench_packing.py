"""Smoke test of scripts/bench_packing.py at its tiny CPU size: it runs and prints the side-by-side table.
It asserts nothing about speed (figures live in README's Performance section, not in tests)."""


def test_bench_packing_runs_and_reports(capsys, bench_script):
    bench = bench_script("bench_packing")
    assert bench.main(["--samples", "8", "--batch", "4", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {w[0]: w for w in map(str.split, out.splitlines()) if w and w[0] in ("padded", "packed") and w[1].isdigit()}
    assert set(rows) == {"padded", "packed"}
    assert int(rows["packed"][1]) < int(rows["padded"][1])  # packing made fewer rows of the same samples
    assert "packed / padded:" in out and "useful tok/s" in out
