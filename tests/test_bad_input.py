"""Bad input to `python -m engine.run`: one line, exit status 2, before any work, and no run folder.

Each case is refused before a feature is extracted (the source k-NN pass is the most expensive part
of a run on ImageNet) and before the run folder is created.
"""
import pytest
import torch

import engine.evaluate
import engine.run
from engine.run import main

FAST = ["--strategy", "linear", "data.workers=0"]


@pytest.fixture
def no_work(monkeypatch):
    """Feature extraction and training fail the test if they are reached."""
    def reached(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(engine.evaluate, "extract_features", reached)
    monkeypatch.setattr(engine.run, "extract_features", reached, raising=False)
    monkeypatch.setattr(engine.run, "train", reached, raising=False)


def refused(capsys, out, *args) -> str:
    """Run the CLI; assert exit 2, a single `error:` line on stderr and nothing left under `out`."""
    before = sorted(out.iterdir()) if out.is_dir() else None
    code = main([*FAST, "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert (sorted(out.iterdir()) if out.is_dir() else None) == before  # no run folder left behind
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "seed must be at least 0, got -1"),
    (["data.workers=-1"], "data.workers must be at least 0, got -1"),
    (["eval.knn_temperature=0"], "eval.knn_temperature must be positive, got 0.0"),
    (["--lr", "nan"], "train.lr must be a finite number, got nan"),
    (["--lr", "inf"], "train.lr must be a finite number, got inf"),
    (["train.warmup_steps=-5"], "train.warmup_steps must be at least 0, got -5"),
    (["data.max_bad_images=-1"], "data.max_bad_images must be at least 0, got -1"),
    (["data.max_image_pixels=-1"], "data.max_image_pixels must be at least 0, got -1"),
    (["--json"], "--json only works with --dry-run"),
])
def test_values_out_of_range_are_refused(tmp_path, capsys, no_work, args, message):
    assert message in refused(capsys, tmp_path / "runs", *args)


@pytest.mark.parametrize("args, message", [
    (["--strategy", "top_k", "--top-k", "50"], "top_k must be between 1 and the model's depth 6, got 50"),
    (["--strategy", "selective_lora", "--active-blocks", "999"], "active_blocks 999 exceeds the 12 LoRA blocks"),
    (["--batch-size", "10", "--grad-accum", "3"], "batch size 10 must be a multiple of grad_accum (3) x ranks (1)"),
    (["--num-classes", "5"], "--num-classes 5 is below the target's 10 classes"),
])
def test_what_only_the_model_can_judge_is_refused_before_any_feature(tmp_path, capsys, no_work, args, message):
    assert message in refused(capsys, tmp_path / "runs", *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs here")
def test_triton_kernels_without_cuda_are_refused_before_any_feature(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel tests' session sets it
    assert "--kernels triton: kernels backend 'triton' needs CUDA" in refused(capsys, tmp_path / "runs",
                                                                                "--kernels", "triton")


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "runs").write_text("a file\n")
    assert refused(capsys, tmp_path, "--out", str(tmp_path / "runs")) == \
        f"error: --out {tmp_path / 'runs'}: {tmp_path / 'runs'} is a file, not a folder"


def test_a_garbage_pth_is_not_a_weights_file_and_no_pickle_advice(tmp_path, capsys, no_work):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(bytes(range(256)) * 8)
    line = refused(capsys, tmp_path / "runs", "--weights", str(garbage))
    assert f"{garbage} is not a weights file" in line
    assert "weights_only" not in line


def test_a_pickle_of_objects_is_not_a_weights_file_and_no_pickle_advice(tmp_path, capsys, no_work):
    pickled = tmp_path / "weights.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module, not a state dict
    line = refused(capsys, tmp_path / "runs", "--weights", str(pickled))
    assert f"{pickled} is not a weights file" in line
    assert "weights_only" not in line and "trust" not in line


def image_folder(root, sizes: dict[str, list[int]]):
    """root/<class>/<i>.png, one square grey PNG per side length listed for the class."""
    from PIL import Image

    for name, sides in sizes.items():
        (root / name).mkdir(parents=True)
        for i, side in enumerate(sides):
            Image.new("L", (side, side), 40 * i).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("layout", ["flat", "train-test"])
def test_a_target_of_one_class_is_refused(tmp_path, capsys, no_work, layout):
    """It would train a one-class head and report 100% on the target."""
    folder = tmp_path / "one"
    image_folder(folder if layout == "flat" else folder / "train", {"only": [32] * 4})
    if layout == "train-test":
        image_folder(folder / "test", {"only": [32] * 2})
    scanned = folder if layout == "flat" else folder / "train"
    assert refused(capsys, tmp_path / "runs", "--target", f"imagefolder:{folder}") == \
        f"error: image folder {scanned} has 1 class folder (only), fewer than the 2 a classifier needs; " \
        f"add class folders beside it"


def test_an_image_over_twice_data_max_image_pixels_counts_as_unreadable(tmp_path, capsys, no_work):
    folder = image_folder(tmp_path / "imgs", {"a": [32, 32, 32], "b": [32, 32, 91]})  # 91 x 91 > 2 x 4096
    line = refused(capsys, tmp_path / "runs", "--target", f"imagefolder:{folder}",
                   "data.max_image_pixels=4096", "data.max_bad_images=0")
    assert line == (f"error: 1 unreadable image, more than data.max_bad_images=0: {folder / 'b' / '2.png'} "
                    f"(too many pixels: 91 x 91, more than twice data.max_image_pixels=4096); "
                    f"replace or remove them, or raise data.max_bad_images")
