"""Data for a run: named data sets read into splits, their preprocessing, and the loaders (DALI or
torch, one switch) that turn a split into sharded `(images, labels)` batches."""
from .bad_images import BadImages
from .datasets import DATASETS, SPEC_HELP, check_spec, load_domain, num_classes
from .loaders import LOADERS, make_loader, resolve_loader
from .splits import Domain, Split, capped, stratified_split
from .transforms import Preprocess

__all__ = ["BadImages", "DATASETS", "LOADERS", "SPEC_HELP", "Domain", "Preprocess", "Split", "capped", "check_spec", "load_domain",
           "make_loader", "num_classes", "resolve_loader", "stratified_split"]
