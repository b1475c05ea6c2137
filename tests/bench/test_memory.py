"""bench.memory: the terms split by ZeRO stage and world size exactly as stated, the largest
micro-batch at the edge, and the prediction against a measured peak on a tiny ViT."""
import pytest

from bench import memory

PARAMS = memory.Parameters(frozen=600, trainable=400, persistent=100, largest_block=50)
ACT = memory.Activations(per_sample=1000.0, fixed=10.0, block_per_sample=100.0, checkpointed_per_sample=200.0,
                         checkpointed_fixed=0.0, working_block_per_sample=50.0)


@pytest.mark.parametrize("stage, weights, master, optimizer, gradients", [
    (0, 4 * 1000, 0, 4 * 400, 4 * 400),
    (1, 4 * 1000, 4 * 400 / 4, 4 * 400 / 4, 4 * 400),
    (2, 4 * 1000, 4 * 400 / 4, 4 * 400 / 4, 4 * 400 / 4),
    (3, 4 * (100 + 900 / 4 + 2 * 50), 0, 4 * 400 / 4, 4 * 400 / 4),
])
def test_terms_split_by_zero_stage_and_world(stage, weights, master, optimizer, gradients):
    p = memory.plan(PARAMS, ACT, optimizer_bytes=4.0, zero_stage=stage, world=4, checkpointing=False, device="cpu")
    assert (p.weights, p.master, p.optimizer, p.gradients) == (weights, master, optimizer, gradients)
    assert p.bucket == 0 and p.overhead == memory.OVERHEAD_BYTES["cpu"] + (0 if stage == 0 else memory.CPU_ZERO_BYTES)
    on_gpu = memory.plan(PARAMS, ACT, 4.0, stage, 4, False, device="cuda")
    assert on_gpu.overhead == memory.OVERHEAD_BYTES["cuda"]
    assert on_gpu.bucket == (0 if stage == 0 else 4 * memory.REDUCE_BUCKET_ELEMENTS)


def test_backward_term_and_the_largest_batch():
    plain = memory.plan(PARAMS, ACT, 4.0, 2, 4, checkpointing=False, device="cpu")
    ckpt = memory.plan(PARAMS, ACT, 4.0, 2, 4, checkpointing=True, device="cpu")
    assert plain.backward(3) == 10 + 1000 * 3 + 50 * 3
    assert ckpt.backward(3) == 200 * 3 + 100 * 3 + 50 * 3
    budget = plain.at(7) + 1
    assert plain.largest_batch(budget) == 7 and plain.at(8) > budget
    assert ckpt.largest_batch(budget) > 7
    assert plain.largest_batch(plain.at(1) - 1) == 0


@pytest.mark.parametrize("text, expected", [("80GB", 80 * 2**30), ("141GiB", 141 * 2**30), ("512M", 512 * 2**20)])
def test_parse_bytes(text, expected):
    assert memory.parse_bytes(text) == expected


def test_prediction_against_a_measured_peak_on_a_tiny_vit():
    """The whole --check path on ViT-Ti at batch 8 (a child process with DeepSpeed, ZeRO-2, SGD):
    activations are most of the peak here, so this checks the calibrated term, not just the weights."""
    config = dict(model="vit_tiny_patch16_224", strategy="full", batch=8, num_classes=10, optimizer="sgd",
                  precision="fp32", zero_stage=2, checkpointing=False)
    (row,) = memory.check_rows([config])
    assert row["measured_mib"] > 100  # the activations of 8 images, not the noise of an empty step
    assert abs(row["error_pct"]) <= 15, row
