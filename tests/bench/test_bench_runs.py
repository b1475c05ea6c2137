"""Each bench's whole code path on a tiny problem, one round, results to tmp_path: the files hold
the rows the tables promise. No timing is asserted (timings belong in bench/, not in tests)."""
import csv
import json
import sys

import pytest

from bench import kernels, loaders, strategy_memory
from bench.device import device_name
from bench.lora_problems import build_problem, useful_flops


def _read(stem):
    """The CSV rows (strings) and the JSON document, checked to hold the same rows."""
    with open(stem.with_name(stem.name + ".csv")) as f:
        rows = list(csv.DictReader(f))
    doc = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert [{k: "" if v is None else str(v) for k, v in r.items()} for r in doc["rows"]] == rows
    return rows, doc


def test_kernels_quick_run_on_the_cpu_providers(results_dir, capsys):
    here_before = {"peft", "transformers"} & set(sys.modules)  # another test of this worker may have (open_clip)
    assert kernels.main(["--quick", "--save", "--shapes", "proj", "--dtypes", "fp32", "--batch", "1", "--rank", "2",
                         "--rounds", "1", "--ratio-rounds", "1", "--threads", "1", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    stem = results_dir / f"kernels-{device_name()}-cpu-clock"
    assert "speedup vs hf-peft" in out and "speedup vs peft-style" in out
    rows, doc = _read(stem)
    assert doc["meta"]["command"].startswith("python -m bench.kernels --quick")
    kernel = [r for r in rows if r["section"] == "kernel"]
    assert [r["provider"] for r in kernel] == ["reference", "peft-style", "hf-peft", "torch", "linear", "torch-g0"]
    p = build_problem("proj", 1, 2, "fp32", "cpu")
    for r in kernel:
        flops = useful_flops(p, r["provider"], "full")
        assert float(r["gflops"]) == pytest.approx(flops / float(r["time_ms"]) / 1e6, rel=1e-3, abs=0.06)
        assert r["work"] == "" and r["note"].startswith("cpu clock")
    ratio = {r["provider"]: r for r in rows if r["section"] == "ratio"}
    assert sorted(ratio) == ["torch-g0/linear", "torch/hf-peft", "torch/peft-style"]
    assert all(float(r["ratio"]) > 0 for r in ratio.values())
    assert {"peft", "transformers"} & set(sys.modules) == here_before  # hf-peft ran in its worker


def test_loaders_on_a_few_generated_jpegs(tmp_path, results_dir):
    folder = loaders.generate_jpegs(32, classes=2, root=tmp_path / "jpegs")
    stem = tmp_path / "loaders"
    assert loaders.main(["--quick", "--data", str(folder), "--sections", "files,wait", "--rounds", "1",
                         "--steps", "2", "--batch-size", "8", "--threads", "1", "--out", str(stem)]) == 0
    rows, _ = _read(stem)
    files = [(r["mode"], r["loader"]) for r in rows if r["section"] == "files"]
    assert files == [(mode, name) for mode in ("train", "eval")
                     for name in ("dali-cpu", "dali-cpu-dali-resize", "torch-pil", "torch-tvio")]
    assert all(int(r["images"]) == 32 and float(r["img_per_s"]) > 0 for r in rows if r["section"] == "files")
    waits = [r for r in rows if r["section"] == "train-wait"]
    assert len(waits) == 2 and all(0 <= float(r["wait_fraction"]) < 1 for r in waits)
    assert not results_dir.exists()


def test_strategy_memory_on_a_tiny_vit(tmp_path, results_dir):
    stem = tmp_path / "memory"  # one configuration: each runs in a process of its own (timm's import)
    assert strategy_memory.main(["--model", "vit_tiny_patch16_224", "--batch", "1", "--num-classes", "3",
                                 "--only", "lora_r8", "--out", str(stem)]) == 0
    (row,), _ = _read(stem)
    assert row["config"] == "lora_r8" and row["model"] == "vit_tiny_patch16_224"
    # ViT-Ti: 12 blocks of width 192; LoRA r = 8 on q and v of every qkv, plus the 3-class head
    assert int(row["trainable_params"]) == 12 * 2 * 8 * (192 + 192) + 3 * 192 + 3
    assert float(row["saved_activations_mb"]) > 0 and row["saved_activations_vs_full"] == ""  # no full row
    assert row["blocks_keeping_activations"] == "0-11 of 12"
    assert not results_dir.exists()


def test_strategies_step_bench_on_a_tiny_vit(results_dir, tmp_path, capsys):
    """The step bench's whole path on ViT-Ti at 32 px, one round: rows, exact counts, the ratios, the picture."""
    from bench import strategies

    only = ("full,linear,lora_r8,selective_lora_10,selective_lora_100,lora_r8_proj,peft_r8_proj,peft_r8_qkv,"
            "timm_full_plain,engine_full,frozen_lower_bound,linear_cached")
    stem = tmp_path / "strategies"
    assert strategies.main(["--quick", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2",
                            "--rounds", "1", "--num-classes", "3", "--threads", "1", "--only", only,
                            "--out", str(stem)]) == 0
    out = capsys.readouterr().out
    rows, doc = _read(stem)
    assert doc["meta"]["command"].startswith("python -m bench.strategies --quick")
    by = {r["label"]: r for r in rows}
    assert set(only.split(",")) | {"lora_r8_unmerged"} <= set(by)
    head = 3 * 192 + 3
    # ViT-Ti: 12 blocks of width 192 (MLP 768); LoRA r 8 on q and v, and on proj, the same for peft's proj
    assert int(by["lora_r8"]["trainable_params"]) == 12 * 2 * 8 * (192 + 192) + head
    assert int(by["lora_r8_proj"]["trainable_params"]) == int(by["peft_r8_proj"]["trainable_params"]) \
        == 12 * 8 * (192 + 192) + head
    assert int(by["peft_r8_qkv"]["trainable_params"]) == 12 * 8 * (192 + 3 * 192) + head
    # peft's rows, measured in its worker: the same counted work as ours on proj, merged to timm's forward
    assert by["peft_r8_proj"]["note"].startswith("HF peft ") and "peft" not in sys.modules
    assert by["peft_r8_proj"]["train_gflops_per_img"] == by["lora_r8_proj"]["train_gflops_per_img"]
    assert float(by["peft_r8_proj"]["saved_activations_mb"]) > 0 and by["peft_r8_proj"]["peak_mem_mb"] != ""
    assert int(by["linear"]["trainable_params"]) == int(by["linear_cached"]["trainable_params"]) == head
    base = float(by["timm_full_plain"]["infer_gflops_per_img"])
    assert float(by["peft_r8_proj"]["infer_gflops_per_img"]) == float(by["peft_r8_qkv"]["infer_gflops_per_img"]) == base
    assert float(by["selective_lora_10"]["infer_gflops_per_img"]) == float(by["selective_lora_100"][
        "infer_gflops_per_img"]) == float(by["lora_r8"]["infer_gflops_per_img"]) == base
    assert float(by["lora_r8_unmerged"]["infer_gflops_per_img"]) > base
    assert float(by["full"]["train_gflops_per_img"]) > float(by["frozen_lower_bound"]["train_gflops_per_img"])
    ratios = {r["label"] for r in rows if r["kind"] == "ratio"}
    for name in ("lora_r8_proj vs peft_r8_proj", "lora_r8 vs peft_r8_qkv", "engine_full / timm_full_plain speed",
                 "lora_r8 / lower bound time", "selective_lora_10 / lower bound time",
                 "full: fraction of fp32 GEMM peak",
                 "selective_lora finalised inference GFLOPs / base", "linear cached features per-epoch speed-up"):
        assert f"ratio: {name}" in ratios, name
    assert stem.with_suffix(".png").stat().st_size > 0
    assert "different work" in out and not results_dir.exists()


def test_strategies_only_takes_row_labels_that_hold_commas(capsys):
    from bench import strategies
    from bench.strategy_steps import ROW_LABELS

    assert strategies.only_rows("lora_r8_fc1,fc2,peft_r8_fc1,fc2,lora_r8,lora_r8_q,k,v,peft_r8_qkv", ROW_LABELS) == [
        "lora_r8_fc1,fc2", "peft_r8_fc1,fc2", "lora_r8", "lora_r8_q,k,v", "peft_r8_qkv"]
    assert strategies.only_rows(None, ROW_LABELS) == list(ROW_LABELS)
    with pytest.raises(SystemExit) as stop:  # refused before any measurement
        strategies.main(["--quick", "--only", "lora_r8,fc2"])
    assert stop.value.code == 2 and "error: unknown row 'fc2'; choose from full, " in capsys.readouterr().err
