import csv
import os
import subprocess
import sys

import pytest

from contrastive_kernels import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("device", "op", "provider", "mode", "dtype", "n", "m", "d", "ms_p50", "ms_p20", "ms_p80",
            "peak_mem_mb", "tflops", "torch", "triton", "commit", "note")


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "contrastive_kernels", "bench", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def _rows(out_dir):
    csvs = [f for f in os.listdir(out_dir) if f.endswith(".csv")]
    assert len(csvs) == 1, csvs
    with open(os.path.join(out_dir, csvs[0]), newline="") as f:
        return csvs[0], list(csv.DictReader(f))


def test_cli_quick_writes_csv_and_png(tmp_path):
    out = tmp_path / "res"
    # --no-memory: each memory sample is a fresh interpreter; test_cpu_memory_subprocess covers it.
    proc = _run(["--quick", "--providers", "dense,chunked", "--no-memory", "--out", str(out), "--quiet"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, rows = _rows(out)
    assert name.startswith("clip_fwd_bwd_") and name.endswith("_float32.csv")
    assert set(REQUIRED) <= set(rows[0])
    timed = [r for r in rows if r["provider"] in ("dense", "chunked")]
    assert sorted((r["provider"], int(r["n"])) for r in timed) == [
        ("chunked", 256), ("chunked", 512), ("dense", 256), ("dense", 512)]
    for r in timed:
        assert r["op"] == "clip" and r["m"] == r["n"] and r["d"] == "256"
        assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        assert float(r["tflops"]) > 0 and r["peak_mem_mb"] == ""
        assert "differs" not in r["note"]
    assert [r["provider"] for r in rows].count("matmul_roof") == 1
    assert os.path.getsize(out / name.replace(".csv", ".png")) > 0
    assert "ms p50" in proc.stdout and "% roof" in proc.stdout


def test_guard_skips_dense_and_modes(tmp_path):
    pytest.importorskip("matplotlib")
    code = bench.main(["--providers", "dense,chunked,open_clip", "--n", "64", "128", "--repeats", "1",
                       "--mode", "bwd", "--no-memory", "--quiet", "--mem-limit-gb", "0.00005",
                       "--out", str(tmp_path)])
    assert code == 0
    _, rows = _rows(tmp_path)
    by = {(r["provider"], int(r["n"])): r for r in rows}
    assert by[("dense", 64)]["ms_p50"] == "" and "skipped" in by[("dense", 64)]["note"]
    assert by[("chunked", 128)]["ms_p50"] != "" and by[("chunked", 128)]["mode"] == "bwd"
    oc = by[("open_clip", 128)]
    assert ("skipped" in oc["note"]) or oc["ms_p50"] == ""


def test_dense_matches_open_clip_formula():
    torch = pytest.importorskip("torch")
    img, txt, s = bench.make_inputs(16, 8, torch.float64, torch.device("cpu"), 0, 14.3)
    logits = s * img @ txt.T
    labels = torch.arange(16)
    ref = (torch.nn.functional.cross_entropy(logits, labels)
           + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(bench.dense_clip_loss(img, txt, s), ref)
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_cpu_memory_subprocess():
    mib, why = bench.measure_memory_cpu("dense", 512, 64, "float32", 0, 14.3, timeout=120)
    assert why == ""
    # dense holds ~4 float32 copies of the 512×512 logits (4 MiB); allow allocator slack
    assert 1.0 < mib < 64.0
