"""One measured CSV row from a fresh process: the step shared by the benchmarks that time a whole
snippet with the memory probe (``bench st``, ``bench matryoshka``, ``bench distill``), and the
control row that shows the same probe seeing a large dense matrix.

The snippet's ``code`` must set ``result = {"ms": sorted call times, "loss": value}``; the row
gets the median / fastest / slowest times, the repeats, the peak memory beyond the setup and the
warm-up, the loss in its note, and the per-run facts of the CSV schema. A failed measurement is
recorded in the row's note and the run goes on.
"""
from __future__ import annotations

# The measured snippet of a setup that defines run(k): ``repeats`` timed calls at size n.
TIMED_CODE = """
import time as _time
times = []
for _ in range({repeats}):
    t0 = _time.perf_counter()
    value = run({n})
    times.append((_time.perf_counter() - t0) * 1e3)
times.sort()
result = {{"ms": times, "loss": value}}
"""


def measure_row(row: dict, *, setup: str, code: str, note: str, timeout: float,
                warmup: str = "run(64)") -> dict:
    """Fill ``row`` (a dict of schema columns) from one probe run and return it."""
    import torch

    from .. import _memprobe
    from .schema import base_facts, loadavg

    try:
        out = _memprobe.peak_extra_bytes(code, setup=setup, warmup=warmup, timeout=timeout)
        ms = out["result"]["ms"]
        row.update(ms_p50=ms[len(ms) // 2], ms_p20=ms[0], ms_p80=ms[-1], repeats=len(ms),
                   peak_mem_mb=out["extra_bytes"] / 2 ** 20,
                   note=f"{note}; loss {out['result']['loss']:.5f}")
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
        row["note"] = f"{note}; error: {str(exc).splitlines()[-1][:200]}"
    row.update(base_facts(torch.device("cpu"), "perf_counter"), loadavg=loadavg())
    return row


def write_control_row(sink, config: str, n: int, m: int, timeout: float) -> dict:
    """Measure and write the control row of a memory point (``op = dense_control``): the probe's
    reading of one float32 n×m matrix written in full, taken in the same run as the point (a
    probe that cannot see this cannot vouch for the fused loss's small reading)."""
    import torch

    from .. import _memprobe
    from .schema import base_facts, loadavg

    out = _memprobe.dense_control(n, m, timeout=timeout)
    row = dict(config=config, op="dense_control", provider="control", ours=False, mode="alloc",
               dtype="float32", n=n, m=m, d=0, peak_mem_mb=out["extra_bytes"] / 2 ** 20,
               note=f"control: one float32 {n}x{m} matrix ({n * m * 4 / 2 ** 30:.1f} GiB) "
                    "through the same probe")
    row.update(base_facts(torch.device("cpu"), "perf_counter"), loadavg=loadavg())
    sink.write(row)
    print(f"control: the probe saw {row['peak_mem_mb']:.0f} MiB of one float32 {n}×{m} matrix "
          f"({n * m * 4 / 2 ** 20:.0f} MiB)", flush=True)
    return row
