"""The DALI and torch loaders: one contract, same samples and labels, eval preprocessing that agrees."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import Split
from engine.errors import UserError
from engine.data import Preprocess, make_loader, resolve_loader
from engine.data.bad_images import BadImages
from engine.data.imagefolder import check_image, open_rgb, scan_split
from engine.data.sharding import shard_indices

from data_fixtures import BOTH, HELD_IN_PARENT, PRE, NeedsTheLock, all_batches, needs_dali, photo, write_good_folder

# One grey level after normalisation, the smallest std dividing: the unit of "agree".
LEVEL = 1 / 255 / min(PRE.std)


def assert_close_to_pil(dali_x: torch.Tensor, torch_x: torch.Tensor, level: float = LEVEL) -> None:
    """A quarter of a grey level apart on average, more than 1.5 levels at no more than 0.5% of the
    pixels. PIL rounds to 8 bits between its horizontal and vertical passes, so where a bicubic
    upscale overshoots a hard edge it clips and DALI does not: those few pixels may differ by more
    (never by 16 levels)."""
    diff = (dali_x - torch_x).abs() / level
    assert diff.mean() <= 0.25
    assert (diff > 1.5).float().mean() <= 0.005
    assert diff.max() <= 16


def array_split(n: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> Split:
    """n photo-like uint8 images; label i for sample i, so labels identify samples."""
    rng = np.random.default_rng(seed)
    images = np.stack([photo(rng, size[1], size[0]) for _ in range(n)])      # (N, H, W, 3) uint8
    return Split(labels=np.arange(n), images=images)


def file_split(root, n_classes: int) -> Split:
    """One image per class folder, so labels identify samples here too."""
    write_good_folder(root, classes=[f"c{i:02d}" for i in range(n_classes)], per_class=1)
    _, split, _ = scan_split(root)
    return split


@pytest.fixture(params=["arrays", "files"])
def unique_split(request, tmp_path) -> Split:
    """23 samples with distinct labels, in memory or as files."""
    return array_split(23) if request.param == "arrays" else file_split(tmp_path / "files", 23)


def test_resolve_loader_names():
    assert resolve_loader("torch") == "torch"
    assert resolve_loader("auto") in ("dali", "torch")
    with pytest.raises(ValueError, match="unknown loader"):
        resolve_loader("tf.data")


def test_without_dali_auto_falls_back_to_torch_and_dali_is_a_user_error(monkeypatch):
    import engine.data.loaders
    import engine.data.torch_loader

    monkeypatch.setattr(engine.data.loaders, "_dali_works", lambda: False)
    assert resolve_loader("auto") == "torch"
    assert isinstance(make_loader(array_split(4), PRE, train=False, batch_size=2), engine.data.torch_loader.TorchLoader)
    with pytest.raises(UserError, match="DALI is not installed"):
        make_loader(array_split(4), PRE, train=False, batch_size=2, loader="dali")


@pytest.mark.parametrize("name", BOTH)
def test_batches_follow_the_contract(name):
    loader = make_loader(array_split(10), PRE, train=False, batch_size=4, loader=name)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    images, labels = batches[-1]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert labels.shape == (2,) and labels.dtype == torch.int64


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_batches_on_request(name, dtype):
    images, _ = next(iter(make_loader(array_split(4), PRE, train=True, batch_size=4, loader=name, dtype=dtype)))
    assert images.dtype == dtype


BILINEAR = Preprocess(**{**PRE.__dict__, "interpolation": "bilinear"})


@needs_dali
@pytest.mark.parametrize("resize", ["dali", "torch"])
@pytest.mark.parametrize("pre", [PRE, BILINEAR], ids=["bicubic", "bilinear"])
def test_eval_preprocessing_agrees_on_image_files(messy_folder, resize, pre):
    """JPEGs of mixed sizes and orientation, grey / RGBA / palette / CMYK / 16-bit PNGs: same order,
    same labels, pixels within a grey level, with either of DALI's resamplers and the model's
    interpolation."""
    root, _, _ = messy_folder
    _, split, _ = scan_split(root)
    dali_x, dali_y = all_batches(make_loader(split, pre, train=False, batch_size=5, loader="dali",
                                             dali_resize=resize))
    torch_x, torch_y = all_batches(make_loader(split, pre, train=False, batch_size=5, loader="torch"))
    assert torch.equal(dali_y, torch.as_tensor(split.labels)) and torch.equal(torch_y, dali_y)
    assert_close_to_pil(dali_x, torch_x)


@needs_dali
@pytest.mark.parametrize("pre", [PRE, Preprocess(input_size=48, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.9)],
                         ids=["down", "up"])
def test_dali_with_torch_resize_equals_torchvision_on_the_decoded_images(messy_folder, pre):
    """On the CPU DALI decodes and torch resamples: exactly torchvision's uint8 Resize + CenterCrop
    of the decoded image (DALI's decoder equals `open_rgb`, tests/data/test_image_folders.py)."""
    from torchvision.transforms import InterpolationMode, v2

    root, _, _ = messy_folder
    _, split, _ = scan_split(root)
    resize_crop = v2.Compose([v2.Resize(pre.resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                              v2.CenterCrop(pre.input_size)])
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    expected = torch.stack([(resize_crop(torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1)) / 255 - mean)
                            / std for path in split.paths])
    x, _ = all_batches(make_loader(split, pre, train=False, batch_size=5, loader="dali", dali_resize="torch"))
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


@needs_dali
@pytest.mark.parametrize("resize", ["dali", "torch"])
def test_train_batches_from_files_with_either_resampler(tmp_path, resize):
    split = file_split(tmp_path / "f", 12)
    x, y = all_batches(make_loader(split, PRE, train=True, batch_size=4, loader="dali", dali_resize=resize))
    assert x.shape == (12, 3, PRE.input_size, PRE.input_size) and torch.isfinite(x).all()
    assert sorted(y.tolist()) == sorted(split.labels.tolist())


@needs_dali
def test_dali_resize_choices_are_checked():
    with pytest.raises(ValueError, match="unknown DALI resize"):
        make_loader(array_split(4), PRE, train=False, batch_size=2, loader="dali", dali_resize="pil")
    with pytest.raises(UserError, match="on a GPU use dali or auto"):
        make_loader(array_split(4), PRE, train=False, batch_size=2, loader="dali", dali_resize="torch",
                    device="cuda")


@needs_dali
@pytest.mark.parametrize("pre", [PRE, Preprocess(input_size=48, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.9),
                                 Preprocess(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0),
                                 Preprocess(input_size=30, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0),
                                 Preprocess(input_size=24, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")],
                         ids=["down", "up", "crop_pct_1", "crop_only", "bilinear"])
def test_eval_preprocessing_agrees_on_uint8_arrays(pre):
    split = array_split(9, size=(30, 40))
    dali_x, dali_y = all_batches(make_loader(split, pre, train=False, batch_size=4, loader="dali"))
    torch_x, torch_y = all_batches(make_loader(split, pre, train=False, batch_size=4, loader="torch"))
    assert dali_x.shape == (9, 3, pre.input_size, pre.input_size)
    assert torch.equal(dali_y, torch_y) and dali_y.tolist() == list(range(9))
    assert_close_to_pil(dali_x, torch_x, level=1 / 255 / min(pre.std))


@pytest.mark.parametrize("name", BOTH)
def test_train_pass_reads_each_sample_at_most_once_and_reshuffles(unique_split, name):
    loader = make_loader(unique_split, PRE, train=True, batch_size=4, loader=name, seed=3)
    first, second = all_batches(loader)[1], all_batches(loader)[1]
    for labels in (first, second):
        assert len(labels) == 20 == 4 * len(loader)              # 23 samples, the partial batch dropped
        assert len(set(labels.tolist())) == 20
    assert first.tolist() != second.tolist()


@needs_dali
@pytest.mark.parametrize("kind", ["arrays", "files"])
def test_train_passes_of_both_loaders_read_the_same_samples(tmp_path, kind):
    split = array_split(24) if kind == "arrays" else file_split(tmp_path / "f", 24)
    labels = {name: all_batches(make_loader(split, PRE, train=True, batch_size=4, loader=name))[1]
              for name in ("dali", "torch")}
    assert sorted(labels["dali"].tolist()) == sorted(labels["torch"].tolist()) == sorted(split.labels.tolist())
    if kind == "arrays":  # both follow shard_indices: the very same order
        assert labels["dali"].tolist() == labels["torch"].tolist()


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_cover_the_split_exactly_once(unique_split, name, world):
    shards = [all_batches(make_loader(unique_split, PRE, train=False, batch_size=4, loader=name,
                                      rank=rank, world=world))[1].tolist() for rank in range(world)]
    assert sum(shards, []) == unique_split.labels.tolist()           # disjoint, complete, in order
    assert all(shard for shard in shards)


@pytest.mark.parametrize("name", BOTH)
def test_train_shards_are_disjoint_and_equally_long(unique_split, name):
    loaders = [make_loader(unique_split, PRE, train=True, batch_size=4, loader=name, rank=r, world=2, seed=1)
               for r in range(2)]
    for _ in range(2):  # two epochs
        a, b = (all_batches(loader)[1].tolist() for loader in loaders)
        assert len(a) == len(b) == 8 == 4 * len(loaders[0])           # 23 // 2 = 11 per rank, 2 full batches
        assert not set(a) & set(b)


@pytest.mark.parametrize("name", BOTH)
def test_split_smaller_than_a_batch_still_trains(name):
    labels = all_batches(make_loader(array_split(3), PRE, train=True, batch_size=8, loader=name))[1]
    assert sorted(labels.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("name", BOTH)
def test_a_pass_abandoned_midway_does_not_shorten_the_next(unique_split, name):
    loader = make_loader(unique_split, PRE, train=False, batch_size=4, loader=name)
    for _ in loader:
        break
    assert all_batches(loader)[1].tolist() == unique_split.labels.tolist()


@pytest.mark.parametrize("name", BOTH)
def test_set_epoch_replays_an_epochs_shuffle(name):
    split = array_split(16)
    orders = []
    for _ in range(2):
        loader = make_loader(split, PRE, train=True, batch_size=4, loader=name, seed=5)
        loader.set_epoch(3)
        orders.append(all_batches(loader)[1].tolist())
    assert orders[0] == orders[1]
    assert orders[0] == shard_indices(16, rank=0, world=1, train=True, seed=5, epoch=3).tolist()


def test_torch_workers_reshuffle_every_epoch():
    loader = make_loader(array_split(16), PRE, train=True, batch_size=4, loader="torch", workers=2)
    first, second = all_batches(loader)[1].tolist(), all_batches(loader)[1].tolist()
    assert sorted(first) == sorted(second) == list(range(16)) and first != second


def damage(path: str, how: str) -> None:
    """Break a file after the scan-time check passed it."""
    if how == "header":
        with open(path, "r+b") as f:
            f.seek(20)
            f.write(b"\xff" * 100)
    elif how == "body":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif how == "middle":  # the first half of the image data cut out; header and end marker intact
        data = open(path, "rb").read()
        scan = data.index(b"\xff\xda")  # start of scan
        open(path, "wb").write(data[:scan + 2] + data[(scan + len(data)) // 2:])
    else:
        Path(path).unlink()


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("how", ["header", "body", "deleted"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_file_broken_after_the_scan_is_a_user_error_naming_it(tmp_path, name, how, train):
    split = file_split(tmp_path / "f", 6)
    victim = split.paths[4]
    damage(victim, how)
    loader = make_loader(split, PRE, train=train, batch_size=2, loader=name)
    with pytest.raises(UserError, match=re.escape(victim)):
        for _ in range(2):  # a training pass drops a batch: two passes surely touch every file
            all_batches(loader)


def test_a_torch_worker_that_cannot_read_a_file_names_it_in_one_line(tmp_path):
    split = file_split(tmp_path / "f", 4)
    damage(split.paths[1], "deleted")
    loader = make_loader(split, PRE, train=False, batch_size=2, loader="torch", workers=2)
    with pytest.raises(UserError, match=re.escape(split.paths[1])) as error:
        all_batches(loader)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_train_flip_follows_the_preprocess(name, hflip):
    """hflip = 0 never mirrors (digits), 1 always does: a dark-left, bright-right image stays or turns."""
    images = np.zeros((8, 32, 32, 3), np.uint8)
    images[:, :, 16:] = 255
    pre = Preprocess(**{**PRE.__dict__, "train_scale": (1.0, 1.0), "hflip": hflip})
    x, _ = next(iter(make_loader(Split(labels=np.arange(8), images=images), pre, train=True, batch_size=8,
                                 loader=name)))
    left, right = x[..., :12].mean(dim=(1, 2, 3)), x[..., -12:].mean(dim=(1, 2, 3))
    assert bool((left < right).all()) if hflip == 0 else bool((left > right).all())


def corrupted_mid_file(root, n: int, bad: list[int]) -> Split:
    """n files (label i = file i), those at `bad` corrupted in the middle after the scan passed them."""
    split = file_split(root, n)
    for i in bad:
        damage(split.paths[i], "middle")
        assert check_image(split.paths[i]) is None  # what the scan sees
    return split


@pytest.mark.parametrize("name", BOTH)
def test_an_image_corrupted_mid_file_is_skipped_counted_and_named_in_evaluation(tmp_path, name):
    """Every other sample is read exactly once, in order, in this pass and the next."""
    split = corrupted_mid_file(tmp_path / "f", 10, bad=[3, 7])
    bad = BadImages(limit=2)
    loader = make_loader(split, PRE, train=False, batch_size=2, loader=name, bad_images=bad)
    for _ in range(2):
        assert all_batches(loader)[1].tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert list(bad.found) == [split.paths[3], split.paths[7]]


@pytest.mark.parametrize("name", BOTH)
def test_an_image_corrupted_mid_file_is_skipped_in_training(tmp_path, name):
    split = corrupted_mid_file(tmp_path / "f", 12, bad=[5])
    bad = BadImages(limit=1)
    loader = make_loader(split, PRE, train=True, batch_size=3, loader=name, bad_images=bad)
    passes = [all_batches(loader)[1].tolist() for _ in range(3)]
    assert all(5 not in labels and len(labels) >= 8 for labels in passes)
    # DALI goes on with a fresh shuffle after the failure, which may repeat a sample in that pass only
    assert all(len(set(labels)) == len(labels) for labels in passes[1:])
    assert list(bad.found) == [split.paths[5]]


@pytest.mark.parametrize("name", BOTH)
def test_past_max_bad_images_the_loader_stops_with_the_list(tmp_path, name):
    split = corrupted_mid_file(tmp_path / "f", 6, bad=[1, 4])
    loader = make_loader(split, PRE, train=False, batch_size=2, loader=name, bad_images=BadImages(limit=1))
    with pytest.raises(UserError) as error:
        all_batches(loader)
    message = str(error.value)
    assert message.startswith("2 unreadable images, more than data.max_bad_images=1: ")
    assert message.index(split.paths[1]) < message.index(split.paths[4])
    assert message.endswith("; replace or remove them, or raise data.max_bad_images") and "\n" not in message


def batches_of_epochs(loader, epochs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("name, workers", [("torch", 0), ("torch", 2), pytest.param("dali", 1, marks=needs_dali)])
def test_start_at_yields_exactly_what_an_uninterrupted_pass_would(unique_split, name, workers):
    """Resume's data position: a fresh loader started at (epoch 1, batch 2) yields the very tensors
    (augmentation included) that a loader which read everything before would."""
    def loader():
        return make_loader(unique_split, PRE, train=True, batch_size=4, loader=name, seed=3, workers=workers)

    straight = batches_of_epochs(loader(), 3)[len(loader()) + 2:]      # epoch 1 from batch 2, then epoch 2
    resumed = loader()
    resumed.start_at(1, 2)
    again = batches_of_epochs(resumed, 2)
    assert len(again) == len(straight) == 2 * len(resumed) - 2
    for (x, y), (x2, y2) in zip(straight, again):
        assert torch.equal(y, y2) and torch.equal(x, x2)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_the_global_batches_of_one_rank_with_twice_the_micro_batch(workers):
    """The equivalence of N ranks and one: batch j of both ranks together is batch j of one rank with
    a micro-batch twice as large, augmentation included (each sample is seeded by itself)."""
    split = array_split(26)
    one = batches_of_epochs(make_loader(split, PRE, train=True, batch_size=8, loader="torch", seed=1,
                                        workers=workers), 2)
    ranks = [batches_of_epochs(make_loader(split, PRE, train=True, batch_size=4, loader="torch", seed=1,
                                           workers=workers, rank=r, world=2), 2) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6                  # 26 // 8 = 3 per epoch
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        together_y, together_x = torch.cat([y0, y1]), torch.cat([x0, x1])
        order, order_together = y.argsort(), together_y.argsort()          # labels identify samples
        assert torch.equal(y[order], together_y[order_together])
        assert torch.equal(x[order], together_x[order_together])


def test_torch_training_pass_leaves_the_global_random_streams_alone():
    """With workers=0 the transforms run in the main process; the model's random stream must not see them."""
    loader = make_loader(array_split(8), PRE, train=True, batch_size=4, loader="torch", workers=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    all_batches(loader)
    assert torch.equal(torch.rand(3), expected)


def test_torch_workers_do_not_inherit_a_lock_the_parent_holds():
    """Forked workers copy whatever locks other threads hold (DALI's, gloo's) and wait on them forever."""
    loader = make_loader(array_split(8), PRE, train=False, batch_size=4, loader="torch", workers=2)
    loader.loader.dataset.transform = NeedsTheLock(PRE.torch_transform(False))
    with HELD_IN_PARENT:
        images, labels = all_batches(loader)
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
