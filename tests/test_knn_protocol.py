"""The paper preset's k-NN follows DINO's eval_knn.py, piece by piece, against our own transcription of it:
Resize 256 bicubic, CenterCrop 224, ImageNet mean/std; the CLS token after the final norm; L2-normalised
features, cosine similarity, the k nearest voting with exp(sim / 0.07), k in 10/20/100/200."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from engine.config import parse_args
from engine.data import Preprocess, Split, make_loader
from engine.knn import knn_accuracy
from engine.models import features
from engine.run import knn_preprocess

PAPER_YAML = Path(__file__).resolve().parents[1] / "configs" / "paper_cifar100.yaml"

# DINO's eval_knn.py, as its protocol reads (our transcription).
DINO_TRANSFORM = T.Compose([
    T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def dino_features(model, images):
    """DINO's ViT forward: patch tokens, CLS prepended, position embedding, blocks, final norm, CLS out."""
    x = model.patch_embed(images)                                           # (B, N, D)
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1)       # (B, 1 + N, D)
    x = x + model.pos_embed
    for block in model.blocks:
        x = block(x)
    return model.norm(x)[:, 0]                                              # (B, D)


def dino_knn_top1(train_features, train_labels, test_features, test_labels, k, t, num_classes):
    """DINO's knn_classifier for one k: normalised features, top-k by dot product, weighted one-hot votes."""
    train_features = F.normalize(train_features, dim=1, p=2)
    test_features = F.normalize(test_features, dim=1, p=2)
    similarity = test_features @ train_features.t()
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    retrieved = torch.gather(train_labels.view(1, -1).expand(len(test_features), -1), 1, indices)
    one_hot = torch.zeros(len(test_features) * k, num_classes).scatter_(1, retrieved.view(-1, 1), 1)
    probs = (one_hot.view(len(test_features), k, num_classes) * (distances / t).exp().view(-1, k, 1)).sum(1)
    predictions = probs.argsort(1, descending=True)
    return 100.0 * (predictions[:, 0] == test_labels).sum().item() / len(test_labels)


@pytest.fixture(scope="module")
def paper_knn_preprocess():
    """The k-NN preprocessing a `paper` preset run builds for vit_base_patch16_224.dino."""
    cfg = parse_args(["--config", str(PAPER_YAML)])
    with torch.device("meta"):
        model = timm.create_model(cfg.model.name, pretrained=False, num_classes=0)
    return knn_preprocess(Preprocess.from_model(model), cfg), cfg


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


SIZES = [(500, 375), (333, 500), (256, 256), (224, 300), (640, 427)]


def test_the_transform_is_dinos(paper_knn_preprocess):
    pre, _ = paper_knn_preprocess
    ours = pre.torch_transform(train=False)
    for image in random_images(SIZES):
        assert torch.equal(ours(image), DINO_TRANSFORM(image))


def test_the_loader_reads_jpeg_files_as_dino_does(tmp_path, paper_knn_preprocess):
    pre, _ = paper_knn_preprocess
    paths = []
    for i, image in enumerate(random_images(SIZES[:3], seed=1)):
        paths.append(str(tmp_path / f"{i}.jpg"))
        image.save(paths[-1], quality=90)
    loader = make_loader(Split(labels=np.arange(3), paths=paths), pre, train=False, batch_size=3, loader="torch")
    (images, labels), = list(loader)
    expected = torch.stack([DINO_TRANSFORM(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(images, expected) and labels.tolist() == [0, 1, 2]


def test_the_feature_is_the_cls_token_after_the_final_norm():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0, depth=2).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x), dino_features(model, x), rtol=0, atol=0)


def test_weighted_knn_matches_dinos_classifier_for_every_k(paper_knn_preprocess):
    _, cfg = paper_knn_preprocess
    assert (cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.eval.knn_report_k) == ([10, 20, 100, 200], 0.07, 20)
    g = torch.Generator().manual_seed(3)
    classes = 7
    centres = torch.randn(classes, 16, generator=g)
    bank_y, query_y = torch.randint(0, classes, (600,), generator=g), torch.randint(0, classes, (80,), generator=g)
    bank = centres[bank_y] + 1.5 * torch.randn(600, 16, generator=g)      # unnormalised, as extracted
    query = centres[query_y] + 1.5 * torch.randn(80, 16, generator=g)
    ours = knn_accuracy(bank, bank_y, query, query_y, cfg.eval.knn_k, cfg.eval.knn_temperature, num_classes=classes)
    for k in cfg.eval.knn_k:
        assert ours[k] == dino_knn_top1(bank, bank_y, query, query_y, k, 0.07, classes)
    assert 0 < min(ours.values()) < 100  # a test that could fail: neither trivial nor hopeless
