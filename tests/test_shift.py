"""Distribution shift (engine.shift): the specs, the corruptions as pure functions of the pixels, the
shift sets of a target, and the masked top-1 they are scored with."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine import shift
from engine.config import build_config
from engine.data import Domain, Split, make_loader, resolve_loader
from engine.data.transforms import Preprocess
from engine.errors import UserError
from engine.evaluate import top1_accuracy

ALL3 = [f"corrupt:{name}@3" for name in shift.CORRUPTIONS]


def _images(n=6, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


# -- specs ---------------------------------------------------------------------------------------------

def test_specs_expand_all_and_auto_in_order_once():
    assert shift.expand_specs(["corrupt:all@3"]) == ALL3
    assert shift.expand_specs(["corrupt:jpeg@5", "corrupt:all@3", "corrupt:jpeg@3"]) == ["corrupt:jpeg@5", *ALL3]
    assert shift.expand_specs(["auto"], "digits") == ALL3      # the embedded target's default
    assert shift.expand_specs(["auto"], "cifar100") == []      # other targets: nothing unless asked
    assert shift.expand_specs(None, "digits") == []            # eval.shift=none


@pytest.mark.parametrize("spec, says", [
    ("corrupt:gaussian_noise@0", "SEVERITY 1-5"), ("corrupt:gaussian_noise@6", "SEVERITY 1-5"),
    ("corrupt:gaussian_noise", "SEVERITY 1-5"), ("corrupt:fog@3", "unknown corruption 'fog'"),
    ("blur@3", "unknown shift spec"), ("imagefolder:", "unknown shift spec")])
def test_malformed_specs_are_refused_by_the_config(spec, says):
    with pytest.raises(UserError, match=says):
        build_config(overrides=[f"eval.shift={spec}"])


def test_the_config_default_is_auto_and_none_turns_it_off():
    assert build_config().eval.shift == ["auto"]
    assert build_config(overrides=["eval.shift=none"]).eval.shift is None


# -- corruptions ---------------------------------------------------------------------------------------

def test_contrast_scales_about_each_images_channel_mean():
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[0, 0] = 255  # half the pixels 255, half 0: mean 0.5 per channel
    out = shift.corrupt_images(img, "contrast", 1)  # CIFAR-10-C's factor 0.75 at severity 1
    assert out[0, 0, 0, 0] == round((0.5 + 0.5 * 0.75) * 255) and out[0, 1, 0, 0] == round((0.5 - 0.5 * 0.75) * 255)


def test_noise_is_seeded_by_the_image_index_not_by_the_batch():
    images = np.full((5, 32, 32, 3), 128, dtype=np.uint8)
    whole = shift.corrupt_images(images, "gaussian_noise", 3)
    pieces = np.concatenate([shift.corrupt_images(images[:2], "gaussian_noise", 3),
                             shift.corrupt_images(images[2:], "gaussian_noise", 3, first_index=2)])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(whole, shift.corrupt_images(images, "gaussian_noise", 3))  # deterministic
    assert not np.array_equal(whole[0], whole[1])  # the same pixels, other noise


def test_constants_follow_the_image_size():
    """CIFAR-10-C's noise sd at 32 px (0.08 at severity 3), ImageNet-C's at 224 px (0.18)."""
    for side, sd in ((32, 0.08), (224, 0.18)):
        grey = np.full((2, side, side, 3), 128, dtype=np.uint8)
        noisy = shift.corrupt_images(grey, "gaussian_noise", 3).astype(float) / 255
        assert abs(noisy.std() - sd) < 0.01


@pytest.mark.parametrize("name", shift.CORRUPTIONS)
def test_each_corruption_keeps_shape_and_type_and_leaves_a_flat_image_alone_or_worse_with_severity(name):
    images = _images()
    outs = [shift.corrupt_images(images, name, s) for s in shift.SEVERITIES]
    assert all(o.shape == images.shape and o.dtype == np.uint8 for o in outs)
    errors = [np.abs(o.astype(float) - images).mean() for o in outs]
    assert errors[0] > 0 and errors[-1] > errors[0]  # severity 5 changes the pixels more than severity 1
    if name in ("gaussian_blur", "contrast", "pixelate"):
        flat = np.full((1, 32, 32, 3), 77, dtype=np.uint8)
        assert np.array_equal(shift.corrupt_images(flat, name, 5), flat)


def test_blur_matches_the_reference_filter():
    from scipy.ndimage import gaussian_filter
    img = _images(1)
    expected = np.clip(gaussian_filter(img[0] / 255.0, sigma=(0.7, 0.7, 0), mode="nearest"), 0, 1) * 255
    assert np.array_equal(shift.corrupt_images(img, "gaussian_blur", 3)[0], expected.round().astype(np.uint8))


# -- shift sets ----------------------------------------------------------------------------------------

def _domain(test: Split, classes=("cat", "dog", "fox")) -> Domain:
    return Domain("toy", list(classes), train=test, test=test)


def test_a_corrupted_set_is_the_target_test_split_corrupted():
    test = Split(labels=np.arange(6) % 3, images=_images())
    (s,) = shift.resolve(["corrupt:pixelate@2"], _domain(test))
    assert s.spec == "corrupt:pixelate@2" and s.class_mask(3) is None
    assert np.array_equal(s.split.labels, test.labels)
    assert np.array_equal(s.split.images, shift.corrupt_images(test.images, "pixelate", 2))


def _write_folder(root, classes, per_class=2, side=20):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_an_image_folder_of_a_subset_of_the_classes_is_labelled_in_the_targets_indices(tmp_path):
    _write_folder(tmp_path / "r", ["fox", "cat"])
    (s,) = shift.resolve([f"imagefolder:{tmp_path / 'r'}"], _domain(Split(labels=[0], images=_images(1))))
    assert sorted(s.split.labels.tolist()) == [0, 0, 2, 2]        # cat = 0, fox = 2 in the target
    assert s.class_mask(4).tolist() == [True, False, True, False]  # a head of 4: dog and the 4th masked


def test_an_image_folder_with_a_class_the_target_lacks_is_refused_in_one_line(tmp_path):
    _write_folder(tmp_path / "r", ["cat", "wolf"])
    with pytest.raises(UserError) as e:
        shift.resolve([f"imagefolder:{tmp_path / 'r'}"], _domain(Split(labels=[0], images=_images(1))))
    assert "class folder wolf is not a class of the target toy" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        shift.resolve([f"imagefolder:{tmp_path / 'missing'}"], _domain(Split(labels=[0], images=_images(1))))


def test_a_test_split_of_files_is_corrupted_on_its_centre_crops(tmp_path):
    _write_folder(tmp_path / "t", ["cat", "dog", "fox"], per_class=1, side=40)
    from engine.data.imagefolder import scan_split
    _, test, _ = scan_split(tmp_path / "t")
    (s,) = shift.resolve(["corrupt:contrast@1"], _domain(test), resize_side=36)
    assert s.split.images.shape == (3, 36, 36, 3) and s.split.in_memory
    with pytest.raises(UserError, match="corrupt it beforehand"):
        shift.resolve(["corrupt:contrast@1"], _domain(test), resize_side=1 << 16)


def test_the_mask_restricts_the_argmax_to_the_sets_classes():
    class Fixed(nn.Module):  # always prefers class 1, then class 2
        def forward(self, x):
            return torch.tensor([[0.0, 5.0, 3.0]]).expand(len(x), -1)

    batches = [(torch.zeros(4, 3, 2, 2), torch.tensor([2, 2, 0, 2]))]
    assert top1_accuracy(Fixed(), batches, torch.device("cpu"), progress=False) == 0
    mask = torch.tensor([True, False, True])
    assert top1_accuracy(Fixed(), batches, torch.device("cpu"), progress=False, class_mask=mask) == 75


def test_shift_top1_scores_each_set_and_the_summary_averages_them():
    test = Split(labels=np.zeros(4, dtype=np.int64), images=_images(4))
    sets = shift.resolve(["corrupt:jpeg@1", "corrupt:contrast@1"], _domain(test))

    class Zero(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), -1)

    def loader(split):
        return [(torch.zeros(len(split), 3, 2, 2), torch.as_tensor(split.labels))]

    got = shift.shift_top1(Zero(), sets, loader, torch.device("cpu"), 3, progress=False, sharded=False)
    assert got == {"corrupt:jpeg@1": 100.0, "corrupt:contrast@1": 100.0}
    assert shift.summary({"a": 50.0, "b": 100.0}) == {"shift_top1": {"a": 50.0, "b": 100.0}, "target_shift_top1": 75.0}
    assert shift.summary({}) == {}


@pytest.mark.skipif(resolve_loader("auto") != "dali", reason="NVIDIA DALI is not installed or does not run here")
def test_both_loaders_read_the_same_corrupted_pixels():
    test = Split(labels=np.arange(6) % 3, images=_images())
    (s,) = shift.resolve(["corrupt:gaussian_noise@4"], _domain(test))
    pre = Preprocess(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
    got = [torch.cat([x for x, _ in make_loader(s.split, pre, train=False, batch_size=4, loader=name)])
           for name in ("torch", "dali")]
    assert torch.allclose(got[0], got[1], atol=1e-5)


def test_the_sweeps_table_shows_shift_top1_where_runs_measured_it(tmp_path):
    import csv
    import json

    from engine.presets import EMBEDDED
    from engine.sweep import build_grid
    from engine.sweep_report import write_report
    from test_sweep import fake_run

    grid = build_grid((EMBEDDED.row("linear"), EMBEDDED.row("lora-r8")), [0, 1], lrs=(0.05,))
    for p in grid:
        fake_run(tmp_path / p.name, p.row.strategy, 50, 60, 80, 1000)
        if p.row.key == "linear":  # lora-r8's runs measured no shift
            path = tmp_path / p.name / "results.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "target_shift_top1": 40.0 + 10 * p.seed}))
    md = write_report(tmp_path, grid, EMBEDDED).splitlines()
    assert md[0].endswith("| Mean 95% CI | shift top-1 % |")
    assert md[2].endswith("| 45.00 +- 7.07 |") and md[3].endswith("| - |")
    with open(tmp_path / "table.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert (rows["linear"]["target_shift_top1"], rows["lora-r8"]["target_shift_top1"]) == ("45.0", "")
