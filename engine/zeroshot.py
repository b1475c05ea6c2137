"""Zero-shot retention: how much of CLIP's zero-shot classification a fine-tuned image tower keeps.

With a CLIP backbone (a timm `*_clip_*` image tower) and `--weights` a CLIP checkpoint that holds the
text tower too (`engine.clip_weights`), `eval.zeroshot=<set>[,<set>...]` scores the image tower
zero-shot on those data sets' test splits before and after fine-tuning:

    image embedding  e = normalise(feature @ P)       feature: timm's pre-logits (CLS after ln_post);
                                                      P: the checkpoint's untouched visual.proj (D, E)
    class embedding  t_c = normalise(mean_j normalise(text(template_j(name_c))))   (open_clip's and
                                                      WiSE-FT's recipe; CLIP's 80 ImageNet templates)
    prediction       argmax_c  e . t_c

The text tower (open_clip, the optional extra `clip`, imported only here) is frozen and run once per
run: the class embeddings are computed when the run starts. With a forgetting curve (engine.curve) the
mean zero-shot top-1 is measured at its steps too (metrics.csv's `zeroshot`), on at most
eval.knn_curve_limit test images of each set, drawn class by class. P stays the checkpoint's, whatever the
strategy trains: the classification head is a separate, new layer.

`model.head_init=zeroshot` starts that head from the target's class embeddings: W = T P^T (C, D),
bias 0, so logits = feature @ P @ T^T = |feature @ P| (e . t_c) and the head's argmax at step 0 is
the zero-shot prediction on the target (no logit scale: the logits are the projected embedding's
dot products with the unit class embeddings). The run keeps it in RUN/zeroshot_head.safetensors,
where `engine.interpolate` reads it back (WiSE-FT interpolates the head from it).

Class names are the data set's (CIFAR's label names, an image folder's folder names, the digits'
"0".."9"), underscores read as spaces.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import clip_weights, data
from .errors import UserError

HEAD_INITS = ("new", "zeroshot")
TEMPLATES = Path(__file__).parent / "assets" / "clip_imagenet_templates.txt"
HEAD_FILE = "zeroshot_head.safetensors"
_TEXT_BATCH = 256


# -- the config check (nothing read but the templates file) -------------------------------------------

def check_config(cfg) -> None:
    """UserError when eval.zeroshot / eval.zeroshot_templates / model.head_init=zeroshot cannot work:
    an unknown data set, a backbone that is not CLIP, no weights file to read the text tower from, a
    templates file that does not exist or has a line without {}."""
    wanted = [name for name, on in (("eval.zeroshot", bool(cfg.eval.zeroshot)),
                                    ("model.head_init=zeroshot", cfg.model.head_init == "zeroshot")) if on]
    for spec in cfg.eval.zeroshot or []:
        data.check_spec(spec, "target")
    if cfg.eval.zeroshot_templates:
        read_templates(cfg.eval.zeroshot_templates)
    if not wanted:
        return
    if not clip_weights.is_clip_model(cfg.model.name):
        raise UserError(f"{wanted[0]} needs a CLIP backbone (a timm CLIP image tower, e.g. "
                        f"vit_base_patch16_clip_224.openai); --model {cfg.model.name} is not one")
    if not cfg.model.weights:
        raise UserError(f"{wanted[0]} needs CLIP's text tower: give --weights FILE, OpenAI's or open_clip's "
                        f"checkpoint (image and text tower in one file)")


def read_templates(path: str | Path | None = None) -> list[str]:
    """Prompt templates, one a line with {} for the class name (# comments and blank lines skipped)."""
    path = Path(path) if path else TEMPLATES
    if not path.is_file():
        raise UserError(f"eval.zeroshot_templates: file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"eval.zeroshot_templates: {path} is not UTF-8 text") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"eval.zeroshot_templates: {path} " + (f"has a template without {{}}: {bad[0]!r}" if bad
                        else "holds no template") + "; write one a line, e.g. a photo of a {}.")
    return templates


# -- the text tower ------------------------------------------------------------------------------------

class TextTower:
    """CLIP's frozen text tower from an OpenAI-layout state dict (open_clip builds it), and the image
    projection of the same checkpoint."""

    def __init__(self, state: dict[str, torch.Tensor], quick_gelu: bool, device: torch.device | str = "cpu"):
        import open_clip

        text = clip_weights.text_state(state)
        with torch.no_grad():
            # open_clip infers the architecture from the shapes; it loads into half precision, so the
            # float32 tensors are loaded again into the float32 model (exactly the checkpoint's values)
            model = open_clip.model.build_model_from_openai_state_dict(dict(text), quick_gelu=quick_gelu,
                                                                       cast_dtype=None).float()
            model.load_state_dict({k: v.float() for k, v in text.items()})
        model.visual = torch.nn.Identity()  # the image tower is timm's
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.tokenize = lambda texts: open_clip.tokenize(texts, context_length=model.context_length)
        self.projection = clip_weights.projection(state)  # (D, E)

    @classmethod
    def from_file(cls, cfg, device="cpu") -> "TextTower":
        from .models import read_weights

        state, _ = read_weights(cfg.model.weights, cfg.model.weights_entry)
        name = Path(cfg.model.weights).name
        if not clip_weights.is_clip_state(state):
            raise UserError(f"weights file {name} is not a CLIP checkpoint (no visual.class_embedding / visual.proj): "
                            f"eval.zeroshot and model.head_init=zeroshot need OpenAI's or open_clip's file")
        if not clip_weights.has_text_tower(state):
            missing = [k for k in clip_weights.TEXT_KEYS if k not in state]
            raise UserError(f"weights file {name} holds no text tower ({missing[0]} missing): eval.zeroshot and "
                            f"model.head_init=zeroshot need a CLIP checkpoint with both towers")
        try:
            return cls(state, clip_weights.uses_quick_gelu(cfg.model.name), device)
        except Exception as e:  # shapes open_clip cannot read as one CLIP
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise UserError(f"cannot build CLIP's text tower from {name}: {first}") from None

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, E) unit text embeddings, float32 on the CPU."""
        out = []
        for i in range(0, len(texts), _TEXT_BATCH):
            tokens = self.tokenize(texts[i:i + _TEXT_BATCH]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)

    def class_embeddings(self, classes: list[str], templates: list[str]) -> torch.Tensor:
        """(C, E): per class, its prompts' unit embeddings averaged and normalised again."""
        names = [c.replace("_", " ") for c in classes]
        prompts = [t.replace("{}", n) for n in names for t in templates]
        emb = self.encode(prompts).view(len(names), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)


# -- scoring -------------------------------------------------------------------------------------------

def image_embeddings(feats: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """(N, E) unit image embeddings from (N, D) backbone features and the (D, E) projection."""
    return F.normalize(feats.float() @ projection.float(), dim=-1)


def zeroshot_top1(feats: torch.Tensor, labels: torch.Tensor, projection: torch.Tensor,
                  class_emb: torch.Tensor) -> float:
    """Top-1 (%) of the cosine argmax over the class embeddings."""
    pred = (image_embeddings(feats, projection) @ class_emb.T).argmax(dim=1)
    return 100.0 * int((pred == labels.to(pred.device)).sum()) / len(labels)


def head_state(class_emb: torch.Tensor, projection: torch.Tensor, num_classes: int | None = None) -> dict:
    """The zero-shot head {"head.weight": (num_classes, D), "head.bias": 0}: logits = feature @ P @ T^T
    (rows past the class embeddings' zero)."""
    weight = class_emb.float() @ projection.float().T                     # (C, D)
    rows = num_classes or len(weight)
    full = torch.zeros(rows, weight.shape[1])
    full[:len(weight)] = weight
    return {"head.weight": full, "head.bias": torch.zeros(rows)}


def _bad_images(cfg, rt) -> data.BadImages:
    return data.BadImages(cfg.data.max_bad_images, say=rt.say, max_pixels=cfg.data.max_image_pixels)


def _domains(cfg, bad: data.BadImages) -> dict:
    """{spec: Domain} of eval.zeroshot's data sets, each read once (a folder scan can be long)."""
    return {spec: data.load_domain(spec, cfg.data.data_root, cfg.seed, role="target", bad_images=bad,
                                   dtd_partition=cfg.data.dtd_partition)
            for spec in dict.fromkeys(cfg.eval.zeroshot or [])}


def _eval_sets(cfg, pre, rt, domains: dict, bad: data.BadImages, limit: int | None = None) -> dict:
    """{spec: (class names, test loader)} of the data sets; `limit`: at most that many test images a
    set, drawn class by class (the forgetting curve's)."""
    return {spec: (domain.classes, data.make_loader(
        data.capped(domain.test, limit, cfg.seed), pre, train=False, batch_size=cfg.eval.batch_size,
        rank=rt.rank, world=rt.world, loader=cfg.data.loader, workers=cfg.data.workers, device=rt.device,
        dali_resize=cfg.data.dali_resize, bad_images=bad)) for spec, domain in domains.items()}


def _scorer(cfg, classes: dict[str, torch.Tensor], projection: torch.Tensor, sets: dict, rt, progress: bool = True):
    from .evaluate import extract_features
    from .precision import PRECISIONS

    amp = PRECISIONS[cfg.train.precision]

    def score(model) -> dict[str, float]:
        out = {}
        for spec, (_, loader) in sets.items():
            feats, labels = extract_features(model, loader, rt.device, amp, desc=f"zero-shot {spec}",
                                             progress=progress and rt.main, sharded=True)
            out[spec] = zeroshot_top1(feats, labels, projection, classes[spec])
        out["mean"] = sum(out.values()) / len(out)
        return out

    return score


def _class_embeddings(cfg, tower: TextTower, sets: dict) -> dict[str, torch.Tensor]:
    templates = read_templates(cfg.eval.zeroshot_templates)
    return {spec: tower.class_embeddings(names, templates) for spec, (names, _) in sets.items()}


def scorer(cfg, pre, rt):
    """model -> {eval.zeroshot set: top-1 %, ..., "mean": %}: the class embeddings computed once, here."""
    bad = _bad_images(cfg, rt)
    tower, sets = TextTower.from_file(cfg, rt.device), _eval_sets(cfg, pre, rt, _domains(cfg, bad), bad)
    return _scorer(cfg, _class_embeddings(cfg, tower, sets), tower.projection, sets, rt)


@dataclass
class ForRun:
    """What engine.run needs, with the text tower read once: the scorer on the eval.zeroshot sets' test
    splits, the forgetting curve's on at most eval.knn_curve_limit images of each (None without a
    curve), and the zero-shot head (model.head_init=zeroshot); each None where not asked for."""
    score: object = None
    curve_score: object = None
    head: dict | None = None


def for_run(cfg, pre, rt, target_classes: list[str], num_classes: int) -> ForRun:
    """ForRun for this run's config. Bad weights are refused here, before the run folder is claimed."""
    if not cfg.eval.zeroshot and cfg.model.head_init != "zeroshot":
        return ForRun()
    tower = TextTower.from_file(cfg, rt.device)
    out = ForRun()
    if cfg.eval.zeroshot:
        bad = _bad_images(cfg, rt)
        domains = _domains(cfg, bad)
        sets = _eval_sets(cfg, pre, rt, domains, bad)
        classes = _class_embeddings(cfg, tower, sets)
        out.score = _scorer(cfg, classes, tower.projection, sets, rt)
        if cfg.eval.knn_curve_limit:
            out.curve_score = _scorer(cfg, classes, tower.projection,
                                      _eval_sets(cfg, pre, rt, domains, bad, cfg.eval.knn_curve_limit), rt,
                                      progress=False)
    if cfg.model.head_init == "zeroshot":
        out.head = head_state(tower.class_embeddings(target_classes, read_templates(cfg.eval.zeroshot_templates)),
                              tower.projection, num_classes)
    return out


def start_head(model, head: dict | None, run_dir: Path, main: bool = True) -> None:
    """model.head_init=zeroshot: the new head takes the zero-shot head; rank 0 keeps it in the run folder."""
    if head is None:
        return
    with torch.no_grad():
        model.head.weight.copy_(head["head.weight"])
        model.head.bias.copy_(head["head.bias"])
    if main:
        from .io import atomic_write_safetensors
        atomic_write_safetensors(Path(run_dir) / HEAD_FILE, {k: v.contiguous() for k, v in head.items()})


def initial_head(cfg, run_dir: Path) -> dict:
    """The zero-shot head a `model.head_init=zeroshot` run started from: RUN/zeroshot_head.safetensors,
    or computed again from the weights file and the target's class names where a run has none."""
    path = Path(run_dir) / HEAD_FILE
    if path.is_file():
        from safetensors.torch import load_file
        return load_file(str(path))
    target = data.load_domain(cfg.data.target, cfg.data.data_root, cfg.seed, role="target",
                              dtd_partition=cfg.data.dtd_partition)
    tower = TextTower.from_file(cfg)
    classes = tower.class_embeddings(target.classes, read_templates(cfg.eval.zeroshot_templates))
    return head_state(classes, tower.projection, cfg.model.num_classes or target.num_classes)


def summary(before: dict | None, after: dict | None) -> dict:
    """results.json's zeroshot_before / zeroshot_after ({set: %, "mean": %}) and zeroshot_forgetting
    (mean before - mean after); nothing when the run measured none."""
    if before is None or after is None:
        return {}
    return {"zeroshot_before": {k: round(v, 4) for k, v in before.items()},
            "zeroshot_after": {k: round(v, 4) for k, v in after.items()},
            "zeroshot_forgetting": round(before["mean"] - after["mean"], 4)}
