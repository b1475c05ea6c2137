"""`python -m engine.export RUN_DIR --merged OUT.safetensors`: a merged model that timm alone rebuilds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import get_strategy
from engine.adapter_files import save_adapter
from engine.config import AdapterConfig, ModelConfig, RunConfig, save_yaml
from engine.export import main
from engine.folder_lock import FolderLock
from engine.models import build_backbone, timm_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """A small model: one intra-op thread (two spin-wait each other on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_run(tmp_path, strategy_name, **options):
    """A run folder as engine.run leaves it: config.yaml + adapter/ of a briefly trained embedded ViT.

    The base weights are a random embedded backbone saved to a file, so the test needs no shipped asset.
    """
    torch.manual_seed(0)
    weights = tmp_path / "base.safetensors"
    save_file(build_backbone(ModelConfig(pretrained=False)).state_dict(), str(weights))
    cfg = RunConfig(strategy=strategy_name, model=ModelConfig(weights=str(weights)), adapter=AdapterConfig(**options))
    run_dir = tmp_path / "run"
    save_yaml(cfg, run_dir / "config.yaml")
    strategy = get_strategy(strategy_name, cfg.adapter)
    backbone = build_backbone(cfg.model)
    base = {"model": "embedded", "weights": str(weights), "num_classes": 10, "timm": timm_spec(backbone)}
    model = strategy.apply(backbone, 10)
    gen = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(1, 4):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=gen)),
                                                 torch.randint(0, 10, (4,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        strategy.on_step(model, step, 3)
    save_adapter(model, strategy, run_dir / "adapter", base)
    return run_dir, model.eval()


@pytest.mark.parametrize("strategy_name, options", [
    ("lora", dict(lora_targets="q,v,fc2")),
    ("block_expansion", dict(blocks=2)),
    ("selective_lora", dict(active_blocks=4)),
])
def test_merged_export_loads_with_timm_alone_and_gives_the_fine_tuned_logits(tmp_path, strategy_name, options):
    run_dir, fine_tuned = make_run(tmp_path, strategy_name, **options)
    x = torch.randn(3, 3, 32, 32)
    expected = fine_tuned(x)
    out = tmp_path / "merged.safetensors"
    assert main([str(run_dir), "--merged", str(out)]) == 0

    spec = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(load_file(str(out)))  # strict: a plain timm state dict
    assert torch.allclose(model.eval()(x), expected, atol=1e-5, rtol=0)


def test_exported_depth_counts_the_expanded_blocks(tmp_path):
    run_dir, _ = make_run(tmp_path, "block_expansion", blocks=3)
    out = tmp_path / "merged.safetensors"
    main([str(run_dir), "--merged", str(out)])
    assert json.loads(out.with_suffix(".json").read_text())["kwargs"]["depth"] == 6 + 3


def test_the_safetensors_metadata_also_names_the_timm_model_and_kwargs(tmp_path):
    run_dir, _ = make_run(tmp_path, "lora")
    out = tmp_path / "merged.safetensors"
    main([str(run_dir), "--merged", str(out)])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == sidecar["name"] and json.loads(meta["timm_kwargs"]) == sidecar["kwargs"]
    assert sidecar["kwargs"]["num_classes"] == 10 and meta["strategy"] == "lora"


def test_a_missing_run_folder_is_one_line_and_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.export", str(tmp_path / "nope"), "--merged",
                           str(tmp_path / "out.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: run folder {tmp_path / 'nope'} does not exist"]


def test_a_run_folder_without_an_adapter_is_a_clear_error(tmp_path, capsys):
    save_yaml(RunConfig(), tmp_path / "config.yaml")
    assert main([str(tmp_path), "--merged", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no adapter (adapter/adapter.json)" in err[0]


def test_a_run_folder_a_live_process_holds_is_not_exported_and_its_holder_named(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path, "lora")
    out = tmp_path / "m.safetensors"
    with FolderLock.take(run_dir, "run folder"):  # as a --resume of it would hold it while it writes
        assert main([str(run_dir), "--merged", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run folder {run_dir} is in use by " in err[0] and f"pid {os.getpid()}" in err[0]
    assert not out.exists()
    assert main([str(run_dir), "--merged", str(out)]) == 0  # released: exported


def test_a_folder_without_config_is_not_a_run_folder(tmp_path, capsys):
    assert main([str(tmp_path), "--merged", str(tmp_path / "out.safetensors")]) == 2
    assert "is not a run folder: it has no config.yaml" in capsys.readouterr().err


def test_restore_applies_the_runs_kernels_backend_which_the_adapter_does_not_record(tmp_path):
    from adapters import LoRALinear
    from engine.models import restore_model

    run_dir, _ = make_run(tmp_path, "lora")
    assert "kernels" not in json.loads((run_dir / "adapter" / "adapter.json").read_text())["adapter_config"]
    cfg = RunConfig(strategy="lora", model=ModelConfig(weights=str(tmp_path / "base.safetensors")))
    cfg.train.kernels = "reference"
    model, _ = restore_model(cfg, run_dir / "adapter")
    backends = {m.backend for m in model.modules() if isinstance(m, LoRALinear)}
    assert backends == {"reference"}


def test_an_adapter_written_with_the_retired_kernels_option_still_loads(tmp_path):
    run_dir, fine_tuned = make_run(tmp_path, "lora")
    meta_path = run_dir / "adapter" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["adapter_config"]["kernels"] = "torch"  # what versions before train.kernels wrote
    meta_path.write_text(json.dumps(meta))
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace(
        "adapter:\n", "adapter:\n  kernels: torch\n"))
    out = tmp_path / "merged.safetensors"
    assert main([str(run_dir), "--merged", str(out)]) == 0


def test_the_sidecar_keeps_the_pretrained_tag_and_timm_gives_back_the_engines_preprocessing():
    """vit_small_patch16_224.dino normalises with ImageNet's mean and std; the bare architecture
    name would give timm's 0.5: the name keeps its tag and pretrained_cfg says it all."""
    from timm.data import resolve_model_data_config

    from engine.data import Preprocess

    backbone = build_backbone(ModelConfig(name="vit_small_patch16_224.dino", pretrained=False))
    spec = json.loads(json.dumps(timm_spec(backbone)))  # as the sidecar holds it
    assert spec["name"] == "vit_small_patch16_224.dino"
    rebuilt = timm.create_model(spec["name"], pretrained=False, pretrained_cfg_overlay=spec["pretrained_cfg"],
                                **spec["kwargs"])
    assert Preprocess.from_model(rebuilt) == Preprocess.from_model(backbone)
    assert resolve_model_data_config(rebuilt)["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_the_exported_embedded_model_preprocesses_32_px_images_as_the_engine_did(tmp_path):
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from engine.data import Preprocess

    run_dir, fine_tuned = make_run(tmp_path, "lora")
    out = tmp_path / "merged.safetensors"
    assert main([str(run_dir), "--merged", str(out)]) == 0
    spec = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(spec["name"], pretrained=False, pretrained_cfg_overlay=spec["pretrained_cfg"],
                              **spec["kwargs"])
    model.load_state_dict(load_file(str(out)))
    engine_pre = Preprocess.from_model(fine_tuned)
    assert Preprocess.from_model(model) == engine_pre and engine_pre.input_size == 32
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    x = create_transform(**resolve_model_data_config(model))(image)[None]      # (1, 3, 32, 32)
    assert torch.allclose(model.eval()(x), fine_tuned(engine_pre.torch_transform(train=False)(image)[None]),
                          atol=1e-5, rtol=0)


def unfinished(run_dir: Path) -> Path:
    """The run folder as a run that stopped early leaves it: checkpoints/best and /last, no adapter/."""
    import shutil

    for tag, step in (("best", 2), ("last", 3)):
        shutil.copytree(run_dir / "adapter", run_dir / "checkpoints" / tag)
        (run_dir / "checkpoints" / tag / "trainer.json").write_text(json.dumps({"step": step, "val_top1": 50.0}))
    shutil.rmtree(run_dir / "adapter")
    return run_dir


def test_a_run_that_did_not_finish_points_to_its_checkpoints_and_exports_them(tmp_path, capsys):
    run_dir, fine_tuned = make_run(tmp_path, "lora")
    unfinished(run_dir)
    out = tmp_path / "merged.safetensors"
    assert main([str(run_dir), "--merged", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run_dir} has no adapter (adapter/adapter.json): the run did not finish; export one of its "
        f"checkpoints instead: --checkpoint best (step 2) or --checkpoint last (step 3)"]
    for tag in ("best", "last"):
        assert main([str(run_dir), "--merged", str(out), "--checkpoint", tag, "--overwrite"]) == 0
        spec = json.loads(out.with_suffix(".json").read_text())
        model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
        model.load_state_dict(load_file(str(out)))
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(model.eval()(x), fine_tuned(x), atol=1e-5, rtol=0)


def test_a_truncated_adapter_is_one_line(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path, "lora")
    weights = run_dir / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main([str(run_dir), "--merged", str(tmp_path / "merged.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: adapter weights {weights} cannot be read")


def test_a_destination_inside_a_file_is_one_line(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path, "lora")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "merged.safetensors"
    assert main([str(run_dir), "--merged", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --merged {out}: {tmp_path / 'afile'} is a file, not a folder"]


def test_a_read_only_destination_is_one_line(tmp_path):
    """A real read-only mount (tmpfs mounted ro in a private user and mount namespace)."""
    import os
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here to mount a read-only file system in")
    run_dir, _ = make_run(tmp_path, "lora")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(ro), sys.executable, "-m", "engine.export",
                           str(run_dir), "--merged", str(ro / "merged.safetensors")],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --merged {ro / 'merged.safetensors'}: cannot create files in {ro} (a read-only file system)"]


def test_an_existing_output_is_kept_unless_overwrite_and_replaced_atomically(tmp_path, capsys, monkeypatch):
    import engine.export
    import safetensors.torch

    run_dir, fine_tuned = make_run(tmp_path, "lora")
    out, sidecar = tmp_path / "merged.safetensors", tmp_path / "merged.json"
    build = engine.export.restore_model

    def not_before_the_check(*args, **kwargs):
        raise AssertionError("the model was built before the destination was checked")

    monkeypatch.setattr(engine.export, "restore_model", not_before_the_check)
    for existing, named in ((out, out), (sidecar, f"{sidecar} (written beside it)")):
        existing.write_text("the user's own")
        assert main([str(run_dir), "--merged", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --merged {out}: {named} already exists; pass --overwrite to replace it, or pick another name"]
        assert existing.read_text() == "the user's own"
        existing.unlink()
    monkeypatch.setattr(engine.export, "restore_model", build)

    out.write_text("an earlier export")
    sidecar.write_text("its spec")

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # --overwrite, and the write fails halfway: the old files stay whole
        m.setattr(safetensors.torch, "save_file", disk_full)
        assert main([str(run_dir), "--merged", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --merged {out}: cannot write it (No space left on device)"]
    assert (out.read_text(), sidecar.read_text()) == ("an earlier export", "its spec")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "merged.json", "merged.safetensors",
                                                          "run"]  # no temporary file left behind

    assert main([str(run_dir), "--merged", str(out), "--overwrite"]) == 0
    spec = json.loads(sidecar.read_text())
    model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(load_file(str(out)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), fine_tuned(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("merged, owned, what", [
    ("results.safetensors", "results.json", "the run's own results.json"),           # finished: results.json exists
    ("source_knn.safetensors", "source_knn.json", "the run's own source_knn.json"),  # not written yet: still the run's
    ("adapter/adapter.safetensors", "adapter/adapter.safetensors", "inside the run's own adapter/"),
    ("checkpoints/best/merged.safetensors", "checkpoints/best/merged.safetensors", "inside the run's own checkpoints/"),
    ("sub/../results.safetensors", "results.json", "the run's own results.json"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_of_the_run_itself_is_never_an_exports_destination(tmp_path, capsys, merged, owned, what, overwrite):
    run_dir = tmp_path / "run"
    save_yaml(RunConfig(), run_dir / "config.yaml")
    (run_dir / "results.json").write_text('{"target_top1": 90.0}')
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter.safetensors").write_text("weights")
    (run_dir / "sub").mkdir()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    out = run_dir / merged
    assert main([str(run_dir), "--merged", str(out)] + ["--overwrite"] * overwrite) == 2
    named = run_dir / owned if owned.endswith(".safetensors") else f"{out.with_suffix('.json')} (written beside it)"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --merged {out}: {named} is {what}, which an export never replaces; write it outside the run "
        f"folder or under another name"]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_the_runs_base_weights_are_never_an_exports_destination(tmp_path, capsys):
    weights = tmp_path / "base.safetensors"
    weights.write_text("the base model")
    save_yaml(RunConfig(model=ModelConfig(weights=str(weights))), tmp_path / "run" / "config.yaml")
    (tmp_path / "link.safetensors").symlink_to(weights)
    for out in (weights, tmp_path / "link.safetensors"):
        assert main([str(tmp_path / "run"), "--merged", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --merged {out}: {out} is the run's base weights (model.weights), which an export never "
            f"replaces; pick another name"]
    assert weights.read_text() == "the base model"


def test_a_new_file_inside_the_run_folder_is_a_fine_destination(tmp_path):
    run_dir, _ = make_run(tmp_path, "lora")
    assert main([str(run_dir), "--merged", str(run_dir / "merged.safetensors")]) == 0
    assert json.loads((run_dir / "merged.json").read_text())["strategy"] == "lora"
