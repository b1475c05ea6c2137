"""bench.triton_aot's table around the compiled rows (the compilation itself is tests/kernels/test_triton_aot.py):
datasheet roofline columns, the summary, the files, and exit 1 when a launch does not fit."""
import csv

import pytest

from bench import triton_aot
from bench.roofline import DATASHEET_PEAKS, roofline_prediction


def _row(kernel="forward", arch="sm_90", dtype="bf16", rank=128, layer="qkv", fits=True, shared=65536):
    return dict(kernel=kernel, arch=arch, device="H100", dtype=dtype, rank=rank, layer=layer, segments=2,
                bias=True, residual=False, config="128x128x64 R32 w8 s3", num_warps=8, shared=shared, regs=128,
                spill_stores=0, spill_loads=0, stack=0, fits=fits, blocks_per_sm=1 if fits else 0,
                problem="" if fits else "shared memory 294912 B > H100's 232448 B per block")


def test_predictions_use_the_named_datasheet_peaks():
    rows = [_row(), _row(kernel="base", rank=0)]
    triton_aot.add_predictions(rows)
    peaks = DATASHEET_PEAKS["sm_90"]
    fused, eager = roofline_prediction(64 * 197, 768, 2304, 128, [768, 768], 2, peaks["gflops"]["bf16"], peaks["gbps"])
    assert rows[0]["fused_us_b64"] == round(fused * 1e6, 1) and rows[0]["eager_us_b64"] == round(eager * 1e6, 1)
    assert rows[0]["peaks"] == peaks["source"] and "datasheet" in rows[0]["peaks"]
    assert rows[0]["smem_limit"] == 227 * 1024
    assert "fused_us_b64" not in rows[1]  # the base GEMM alone: no LoRA to predict


def test_the_summary_keeps_the_worst_case_of_each_config():
    rows = [_row(rank=64, shared=1000), _row(rank=128, shared=3000, fits=False)]
    (line,) = triton_aot.summary(rows)
    assert line["ranks"] == "64,128" and line["launches"] == 2 and line["shared"] == 3000 and not line["fits"]


@pytest.mark.parametrize("fits", [True, False])
def test_main_writes_the_table_and_fails_when_a_launch_does_not_fit(tmp_path, monkeypatch, capsys, fits):
    monkeypatch.setattr(triton_aot, "compile_tables", lambda archs, representative, jobs: [_row(fits=fits)])
    code = triton_aot.main(["--arch", "sm_90", "--out", str(tmp_path / "aot")])
    assert code == (0 if fits else 1)
    with open(tmp_path / "aot.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert tuple(row) == triton_aot.COLUMNS and row["fits"] == str(fits)
    out = capsys.readouterr()
    assert "datasheet peaks (not measured)" in out.out
    assert ("does not fit" in out.err) != fits
