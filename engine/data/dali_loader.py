"""DALI pipelines that turn a Split into (images, labels) batches, the same way the torch path does.

Two pipelines share one augmentation graph:

- files (ImageFolder): `readers.file` over the scanned paths and labels (so the sample set and
  label order are the torch path's) -> decode (`mixed` on a GPU, `cpu` here) -> augment. The reader
  takes them as a file list, written (absolute paths, as the bytes the file system gave) for the
  build and removed after it: its `files` argument takes only UTF-8 text, and a name that is not
  UTF-8 (`caf\\xe9.png`) failed there. A name with a line break, which the list (one path a
  line) cannot hold, is refused when the loader is made;
- arrays (CIFAR, digits, the embedded domain): an external source fed from the uint8 array ->
  augment.

Augment, following `Preprocess` (the model's pretrained config):

- train: random-resized crop (area `train_scale`, aspect 3/4-4/3) + flip (`hflip`). For files the
  crop is fused into the decoder, which then decodes only the crop window.
- eval: torchvision's `Resize(size / crop_pct)` (short side; long side truncated) + `CenterCrop`
  (offsets rounded half to even), computed from each image's shape; only the crop window is
  resized (a resize with a region of interest: the same arithmetic as resize-then-crop, without
  computing the border it discards). The model's interpolation (bicubic, or bilinear where its
  pretrained config says so) with antialiasing, as PIL's: on photographs the two
  paths agree within one grey level (mean under a quarter); where a bicubic upscale overshoots a
  hard edge, PIL's 8-bit intermediate clips and DALI's float one does not, which moves a few
  pixels by more.

Then normalise with `mean` / `std` into CHW float (fp16 straight from DALI; bf16 converted after).

The resampler of the file pipeline (`resize`): on a GPU, DALI's own (`fn.resize`). On the CPU,
torch's by default, called from the pipeline (`fn.python_function`, one thread pool of `threads`):
DALI's CPU resampler is scalar and takes about 3 ms per photo to 224 px where torch's SIMD uint8
one takes 0.3 ms (bench/README.md), so with it DALI reads JPEGs slower than a torch DataLoader.
torch's resamples as torchvision's Resize + CenterCrop on uint8 tensors does (8-bit between passes,
like PIL). In-memory arrays keep DALI's resampler: upscaling small images is fast there.

Sharding: evaluation gives rank r shard r of `world` (the file reader's `shard_id`, `num_shards`),
pads the last batch in the reader and trims the padding in the iterator (`LastBatchPolicy.PARTIAL`),
so each sample is scored exactly once across ranks. Training reads, in both pipelines, this rank's
share of the epoch's shared permutation (`engine.data.sharding.shard_indices`: the shards of one
epoch are disjoint) and drops the last partial batch; every rank yields `(N // world) // batch_size`
batches. A training pipeline lives for one pass (see `DaliLoader`).

CPU mode is `device_id=None` (CPU operators only), which runs without a driver.
"""
from __future__ import annotations

import math
import os
import re
import tempfile

import numpy as np
import torch

from ..errors import UserError
from .bad_images import BadImages, shown
from .sharding import shard_indices, shard_size
from .splits import Split
from .transforms import Preprocess

_ASPECT = (3 / 4, 4 / 3)  # torchvision's and timm's random-resized-crop ratio range
RESIZERS = ("auto", "dali", "torch")  # the file pipeline's resampler: see make_dali_loader


def dali_works() -> bool:
    """Whether DALI imports and runs a CPU pipeline here (about a second; callers cache the answer)."""
    try:
        from nvidia.dali import fn, pipeline_def, types  # noqa: F401
    except Exception:
        return False
    try:
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def probe():
            return fn.random.uniform(range=(0.0, 1.0), shape=(1,))

        pipe = probe()
        pipe.build()
        pipe.run()
        return True
    except Exception:
        return False


def make_dali_loader(split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int = 0,
                     workers: int = 0, rank: int = 0, world: int = 1, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32, resize: str = "auto",
                     bad_images: BadImages | None = None) -> "DaliLoader":
    """`engine.loaders.make_loader`'s DALI path; `workers` DALI threads (at least one).

    `resize`: the file pipeline's resampler, `dali`, `torch` (CPU only) or `auto` (torch on the CPU).
    """
    device = torch.device(device or "cpu")
    if resize not in RESIZERS:
        raise ValueError(f"unknown DALI resize {resize!r}; choose from {', '.join(RESIZERS)}")
    if resize == "torch" and device.type == "cuda":
        raise UserError("data.dali_resize=torch resamples on the CPU; on a GPU use dali or auto")
    if resize == "auto":
        resize = "dali" if device.type == "cuda" else "torch"
    return DaliLoader(split, preprocess, train=train, batch_size=batch_size, seed=seed, threads=max(1, workers),
                      rank=rank, world=world, device=device, dtype=dtype, resize=resize, bad_images=bad_images)



class DaliLoader:
    """An iterable of (images, labels) passes over a Split, built on DALI pipelines.

    Each `iter()` is one pass. Training builds a fresh pipeline for every pass, seeded from (seed,
    rank, epoch) and reading that epoch's `shard_indices` order, so epoch e's batches do not depend
    on how many passes ran before in this process: `start_at(e, j)` (resume) rebuilds epoch e and
    draws and drops its first j batches (DALI's random operators advance per batch, so replaying
    them is the one way to reach batch j's augmentation; the cost is at most one epoch of loading,
    once). Evaluation builds its pipeline on the first pass and keeps it; a pass abandoned midway (a
    `break`) gets a fresh one next time, since DALI cannot restart a pass it did not finish.
    """

    def __init__(self, split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int,
                 threads: int, rank: int, world: int, device: torch.device, dtype: torch.dtype,
                 resize: str = "dali", bad_images: BadImages | None = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        images = split.images
        if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
            raise ValueError(f"in-memory images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if images is None:
            _check_listable(split.paths)
        self.split, self.preprocess, self.train = split, preprocess, train
        self.batch_size, self.seed, self.threads = batch_size, seed, threads
        self.rank, self.world, self.device, self.dtype = rank, world, device, dtype
        self.resize = resize
        self._epoch = 0             # training: the epoch of the next pass
        self._skip = 0              # training: batches of the next pass to draw and drop (start_at)
        self._iterator = None       # evaluation: the pipeline kept between passes
        self._builds = 0
        self._stale = False         # evaluation: set while a pass is unfinished, or after one went on rebuilt
        self.bad_images = BadImages() if bad_images is None else bad_images
        self._files = split         # the files not (yet) known to be unreadable
        self._shard_size = shard_size(len(split), rank=rank, world=world, train=train)
        # A split smaller than one batch still trains, on one partial batch (as the torch path does).
        self._drop_last = train and self._shard_size >= batch_size

    def __len__(self) -> int:
        if self._drop_last:
            return self._shard_size // self.batch_size
        return math.ceil(self._shard_size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Training: the next pass is epoch `epoch` (its shuffle and its augmentation seed)."""
        self._epoch = epoch

    def start_at(self, epoch: int, batch: int) -> None:
        """Training: the next pass is epoch `epoch` from its batch `batch` on, exactly as an
        uninterrupted pass would have yielded them."""
        self._epoch, self._skip = epoch, batch

    def __iter__(self):
        if self.train:
            epoch, skip, self._skip = self._epoch, self._skip, 0
            self._epoch += 1
            iterator = self._build(epoch, self._files, (self.rank, self.world))
        else:
            epoch, skip = None, 0
            if self._iterator is None or self._stale:
                self._iterator = self._build(None, self._files, (self.rank, self.world))
            iterator = self._iterator
            self._stale = True  # until this pass ends: a pass abandoned midway cannot be resumed
        batches, rebuilt = 0, False
        for out, rebuilt in self._outputs(iterator, epoch):
            images, labels = out[0]["images"], out[0]["labels"]
            if labels.numel() == 0:  # a shard's padding-only tail batch
                continue
            batches += 1
            if batches <= skip:
                continue  # drawn and dropped for resume
            if batches > len(self):
                if rebuilt:  # a pipeline built for the rest of this pass ends with it
                    break
                continue  # equal batch counts on every rank; an extra batch is drained, not used
            yield self._to_output(images, labels)
        if not self.train:
            self._stale = rebuilt

    def _outputs(self, iterator, epoch: int | None):
        """(output, whether the pass is on a rebuilt pipeline) for one pass. A file DALI cannot read
        is recorded in `bad_images` (a UserError past the limit) and the pass goes on without it: in
        evaluation on a pipeline over the files it has not yet read (each sample still once), in
        training on the epoch's pipeline rebuilt over the readable files (the pass ends at its
        usual batch count, so a few samples of that epoch may be drawn twice)."""
        it, files, shard, done, rebuilt = iter(iterator), self._files, (self.rank, self.world), 0, False
        while True:
            try:
                out = next(it)
            except StopIteration:
                return
            except (RuntimeError, UnicodeDecodeError) as e:  # DALI cannot go on with this pipeline
                if self.split.in_memory:
                    raise
                # DALI's message names a file by its bytes; one that is not UTF-8 fails to decode
                message = e.object.decode("utf-8", "surrogateescape") if isinstance(e, UnicodeDecodeError) else str(e)
                rank, world = shard
                mine = files.subset(range(len(files) * rank // world, len(files) * (rank + 1) // world))
                unread = mine.subset(range(min(done * self.batch_size, len(mine)), len(mine)))
                path, reason = self._unreadable(message, (files if self.train else unread).paths)
                path = _ours(path, files.paths)
                if path not in files.paths:  # not one of ours: going on would only fail again
                    raise UserError(f"DALI cannot read {shown(path)} ({reason})") from None
                self.bad_images.add(path, reason)
                self._forget(path)
                files, shard = (self._files, (self.rank, self.world)) if self.train else (_without(unread, path), (0, 1))
                if len(files) == 0:  # it was the pass's last file: the pass ends; the next one is built afresh
                    self._iterator = None
                    return
                it, rebuilt, done = iter(self._build(epoch, files, shard)), True, 0
                continue
            done += 1
            yield out, rebuilt

    def _unreadable(self, message: str, candidates: list[str]) -> tuple[str, str]:
        """The file (and why) that stopped DALI. DALI names it only for some failures (a broken JPEG
        body, not a broken header, nor a file deleted since the scan): otherwise the candidates
        are read and decoded one by one to find it (in evaluation only the next few batches'
        files: DALI reads in file order and prefetches two batches)."""
        match = _FAILED_SAMPLE.search(message)
        if match:
            return match.group(1).strip(), "DALI cannot decode it"
        if not self.train:
            candidates = candidates[:4 * self.batch_size]
        found = _first_undecodable(candidates[:_MAX_PROBES])
        if found is None:
            reason = message.split("encountered:")[-1].strip().splitlines()[0]
            raise UserError(f"DALI stopped ({shown(reason)}) on {len(self.split)} files that each decode on their own; "
                            f"--loader torch reads them one at a time (and skips and names any it cannot read)")
        return found

    def _forget(self, path: str) -> None:
        """Leave `path` out of every later pass."""
        self._files = _without(self._files, path)
        self._shard_size = shard_size(len(self._files), rank=self.rank, world=self.world, train=self.train)

    def _to_output(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, self.dtype, non_blocking=True)           # (B, 3, S, S)
        labels = labels.reshape(-1).to(self.device, torch.int64, non_blocking=True)  # (B,)
        return images, labels

    def _build(self, epoch: int | None, files: Split, shard: tuple[int, int]):
        """A DALI iterator: one training pass over `epoch` of `files`, or (epoch None) the evaluation
        pipeline over shard `shard` (index, count) of `files`."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._builds += 1
        gpu = self.device.type == "cuda"
        # Augmentations differ per rank; the shuffle (shard_indices) does not. Epoch 0 keeps the
        # seed the first build always had, so the first epoch reads as it did before training
        # pipelines were rebuilt per epoch.
        stream = self._builds if epoch is None else epoch + 1
        common = dict(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None,
                      seed=(self.seed * 7919 + self.rank * 104729 + stream) % (2**31 - 1),
                      prefetch_queue_depth=2)
        out_dtype = _dali_dtype(self.dtype)
        order = None if epoch is None else shard_indices(len(files), rank=self.rank, world=self.world,
                                                           train=True, seed=self.seed, epoch=epoch)
        if self.split.in_memory:
            source = _ArrayBatches(self, order)
            pipe = _array_pipeline(source, self.preprocess, self.train, gpu, out_dtype, **common)
            return DALIGenericIterator(pipe, ["images", "labels"], auto_reset=True, prepare_first_batch=False)
        torch_resize = _TorchResize(self.preprocess, self.train, self.threads) if self.resize == "torch" else None
        if order is None:  # evaluation: DALI's reader shards the file list in order
            paths, labels, reader_shard = files.paths, files.labels, dict(shard_id=shard[0], num_shards=shard[1])
        else:  # training: this rank's files of the epoch, in their order
            paths, labels, reader_shard = [files.paths[i] for i in order], files.labels[order], {}
        policy = LastBatchPolicy.DROP if self._drop_last else LastBatchPolicy.PARTIAL
        with tempfile.TemporaryDirectory(prefix="dali-files-") as folder:  # read once, when the pipeline is built
            file_list = _write_file_list(os.path.join(folder, "files.txt"), paths, labels)
            pipe = _file_pipeline(file_list, self.preprocess, self.train, gpu, out_dtype, torch_resize,
                                  **reader_shard, **common)
            return DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader", last_batch_policy=policy,
                                       auto_reset=True, prepare_first_batch=False)


class _ArrayBatches:
    """The array pipeline's external source: each call is one pass, batch by batch, over `order`
    (a training epoch's shard) or, for evaluation, this rank's slice in order. DALI calls it again
    when a pass ends (`cycle="raise"`); a training pipeline is dropped after its one pass."""

    def __init__(self, loader: DaliLoader, order: np.ndarray | None) -> None:
        self.loader, self.order = loader, order

    def __call__(self):
        L = self.loader
        order = self.order if self.order is not None else \
            shard_indices(len(L.split), rank=L.rank, world=L.world, train=False, seed=L.seed)
        stop = len(order) - len(order) % L.batch_size if L._drop_last else len(order)
        images, labels = L.split.images, L.split.labels  # (N, H, W, 3) uint8, (N,) int64
        for start in range(0, stop, L.batch_size):
            index = order[start:start + L.batch_size]
            yield images[index], labels[index]           # (B, H, W, 3), (B,)


def _dali_dtype(dtype: torch.dtype):
    from nvidia.dali import types
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT  # bf16: DALI has none; cast after


def _array_pipeline(source, preprocess: Preprocess, train: bool, gpu: bool, out_dtype, **pipe_args):
    from nvidia.dali import fn, pipeline_def, types

    image_shape = source.loader.split.images.shape[1:3]        # (H, W)

    @pipeline_def(**pipe_args)
    def arrays():
        images, labels = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise",
                                            layout=["HWC", ""], dtype=[types.UINT8, types.INT64])
        if gpu:
            images = images.gpu()
        if train:
            images = fn.random_resized_crop(images, size=(preprocess.input_size,) * 2,
                                            random_area=preprocess.train_scale, random_aspect_ratio=_ASPECT,
                                            num_attempts=10, interp_type=_dali_interp(preprocess), antialias=True)
        else:  # one shape for the whole array: the crop window is a constant
            images = _eval_resize_fixed(images, image_shape, preprocess)
        return _normalise(images, preprocess, train, out_dtype), labels

    return arrays()


def _check_listable(paths: list[str]) -> None:
    """Refuse, naming it, a file name DALI's file list cannot hold (one path a line)."""
    for path in paths:
        if "\n" in path:
            raise UserError(f"DALI's file reader cannot take the file name {shown(path)} (it holds a line break); "
                            f"rename the file, or use --loader torch")


def _write_file_list(path: str, files: list[str], labels) -> str:
    """DALI's file list at `path`: one `<absolute path> <label>` a line, the path as the file system's
    bytes (`os.fsencode`, once for the whole text: a million paths in about a second)."""
    here = os.getcwd() + os.sep
    text = "".join([f"{'' if file.startswith(os.sep) else here}{file} {label}\n"
                    for file, label in zip(files, np.asarray(labels).tolist())])
    with open(path, "wb") as f:
        f.write(os.fsencode(text))
    return path


def _ours(path: str, paths: list[str]) -> str:
    """The entry of `paths` that DALI's message names by its absolute path (else `path` itself)."""
    if path in paths:
        return path
    return next((p for p in paths if os.path.abspath(p) == path), path)


def _file_pipeline(file_list: str, preprocess: Preprocess, train: bool, gpu: bool, out_dtype, torch_resize,
                   *, shard_id: int = 0, num_shards: int = 1, **pipe_args):
    """The files and labels of `file_list` in reading order (no shuffle: a training pass gets its
    epoch's order); `torch_resize`: a `_TorchResize` that resamples the decoded images, or None for
    DALI's resize."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(**pipe_args)
    def file_reader():
        encoded, label = fn.readers.file(
            file_list=file_list, name="reader",
            shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, stick_to_shard=True)
        decoder = "mixed" if gpu else "cpu"
        if train:  # the crop window is fused into the decoder, which decodes only that window
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   adjust_orientation=False, random_area=preprocess.train_scale,
                                                   random_aspect_ratio=_ASPECT, num_attempts=10)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
        if torch_resize is not None:
            images = fn.python_function(images, function=torch_resize, batch_processing=True, output_layouts="HWC")
        elif train:
            images = fn.resize(images, size=(preprocess.input_size,) * 2, interp_type=_dali_interp(preprocess),
                               antialias=True)
        else:  # the shape of the encoded image (H, W, C), read without decoding
            images = _eval_resize(images, fn.peek_image_shape(encoded, adjust_orientation=False), preprocess)
        return _normalise(images, preprocess, train, out_dtype), label

    return file_reader()


class _TorchResize:
    """The file pipeline's CPU resampler: torch's antialiased bicubic (or bilinear) on uint8, a batch at a time.

    Train: each decoded crop window to input_size squared. Eval: torchvision's Resize(short side) +
    CenterCrop on each image. Images are spread over a pool of `threads` threads (torch's resize
    releases the GIL), which run while DALI's own threads wait for this stage.
    """

    def __init__(self, preprocess: Preprocess, train: bool, threads: int) -> None:
        self.preprocess, self.train, self.threads = preprocess, train, threads
        self._pool = None

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self._pool is None:  # made on first use, in the pipeline's process
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-torch-resize")
        return list(self._pool.map(self._one, images))

    def _one(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        C = self.preprocess.input_size
        if self.train:
            new_h, new_w, top, left = C, C, 0, 0
        else:
            new_h, new_w, top, left = _eval_window(h, w, self.preprocess)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) channels-last
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=_torch_interp(self.preprocess),
                                                antialias=True)
        x = x[0, :, top:top + C, left:left + C]                                    # (3, C, C) uint8
        return x.permute(1, 2, 0).contiguous().numpy()                            # (C, C, 3)

    def __del__(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _torch_interp(preprocess: Preprocess) -> str:
    """The model's interpolation as torch names it: bilinear when it asks for that, bicubic otherwise
    (timm's default, and what its 'random' train interpolation most often draws)."""
    return "bilinear" if preprocess.interpolation == "bilinear" else "bicubic"


def _dali_interp(preprocess: Preprocess):
    from nvidia.dali import types
    return types.INTERP_LINEAR if _torch_interp(preprocess) == "bilinear" else types.INTERP_CUBIC


def _eval_window(h: int, w: int, preprocess: Preprocess) -> tuple[int, int, int, int]:
    """torchvision's Resize(short side S) then CenterCrop(C) of an h x w image, as numbers:
    (resized h, resized w, crop top, crop left). The long side is truncated, offsets round half to even."""
    S, C = preprocess.resize_size, preprocess.input_size
    new_h, new_w = (S, S * w // h) if w > h else (S * h // w, S)
    return new_h, new_w, round((new_h - C) / 2), round((new_w - C) / 2)


def _eval_resize_fixed(images, hw: tuple[int, int], preprocess: Preprocess):
    """`_eval_resize` for images that all have shape `hw`: the window is computed here, once."""
    from nvidia.dali import fn, types

    h, w = hw
    C = preprocess.input_size
    new_h, new_w, top, left = _eval_window(h, w, preprocess)
    if (new_h, new_w) == (h, w):  # no resize (crop_pct 1 at the native size): a crop alone
        return images if (h, w) == (C, C) else fn.slice(images, start=(top, left), shape=(C, C), axes=(0, 1))
    sy, sx = h / new_h, w / new_w
    return fn.resize(images, size=(C, C), roi_start=(top * sy, left * sx), roi_end=((top + C) * sy, (left + C) * sx),
                     roi_relative=False, interp_type=_dali_interp(preprocess), antialias=True)


def _eval_resize(images, shape, preprocess: Preprocess):
    """torchvision's Resize(short side S) + CenterCrop(C) per image, as a resize of the crop window.

    `_eval_window` in graph arithmetic on each image's `shape` (H, W, C). The window in source pixels
    is the crop offset times source / resized, and resizing it to C x C keeps the scale
    resized / source, so every output pixel samples the source where resize-then-crop would,
    without computing the border the crop discards. One pass: PIL instead rounds to 8 bits between
    its horizontal and vertical passes, which differs from it only where a bicubic upscale overshoots.
    (Two DALI passes match PIL exactly but cost twice as much: DALI's horizontal-only CPU resize is slow.)
    """
    from nvidia.dali import fn, types

    S, C = preprocess.resize_size, preprocess.input_size
    h = fn.cast(shape[0], dtype=types.INT64)
    w = fn.cast(shape[1], dtype=types.INT64)
    wide = fn.cast(w > h, dtype=types.INT64)                 # 1 when the short side is the height
    new_h = wide * S + (1 - wide) * ((S * h) // w)
    new_w = wide * ((S * w) // h) + (1 - wide) * S
    top, left = _half_even_half(new_h - C), _half_even_half(new_w - C)
    scale_y = fn.cast(h, dtype=types.FLOAT) / fn.cast(new_h, dtype=types.FLOAT)
    scale_x = fn.cast(w, dtype=types.FLOAT) / fn.cast(new_w, dtype=types.FLOAT)
    y0, x0 = fn.cast(top, dtype=types.FLOAT) * scale_y, fn.cast(left, dtype=types.FLOAT) * scale_x
    roi_start, roi_end = fn.stack(y0, x0), fn.stack(y0 + C * scale_y, x0 + C * scale_x)
    return fn.resize(images, size=(C, C), roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                     interp_type=_dali_interp(preprocess), antialias=True)  # (C, C, 3)


def _half_even_half(d):
    """round(d / 2) with ties to even (Python's round, which torchvision's CenterCrop uses), d >= 0."""
    k = d // 2
    return k + (d % 2) * (k % 2)


def _normalise(images, preprocess: Preprocess, train: bool, out_dtype):
    from nvidia.dali import fn

    mirror = fn.random.coin_flip(probability=preprocess.hflip) if train and preprocess.hflip > 0 else 0
    return fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * m for m in preprocess.mean], std=[255.0 * s for s in preprocess.std])


_FAILED_SAMPLE = re.compile(r"Failed to decode sample[^:]*:\s*(\S.*)")
_MAX_PROBES = 20_000  # about 20 s of single-image decodes, only ever after a failure


def _first_undecodable(paths: list[str]) -> tuple[str, str] | None:
    """The first of `paths` that cannot be read or that DALI's CPU decoder rejects (with why), one at a time."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_async=False, exec_pipelined=False)
    def probe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    pipe = probe()
    pipe.build()
    for path in paths:
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            return path, f"{type(e).__name__}: {e.strerror}"
        try:
            pipe.feed_input("encoded", [data])
            pipe.run()
        except RuntimeError:
            return path, "DALI cannot decode it"
    return None


def _without(files: Split, path: str) -> Split:
    return files.subset([i for i, p in enumerate(files.paths) if p != path])
