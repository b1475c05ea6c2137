"""This project's `kernels` and `adapters`, whatever else the environment installs under those names.

Two well-known distributions install top-level packages named as two of ours: Hugging Face's
`kernels` (a dependency of transformers, so of peft) and AdapterHub's `adapters`. A process holds
one module per name, and Python's path search would hand out whichever comes first on sys.path:
theirs from site-packages when a command starts outside the clone, ours from the clone's root
(which then breaks transformers). So `engine` pins the two names when it is imported: a finder at
the front of `sys.meta_path` answers `import kernels` and `import adapters` with the packages that
sit beside this `engine` (the source tree, or `_vit_forget_not/` in a wheel install: setup.py puts
them there so that no file of another distribution is ever replaced).

The price: transformers (and so peft) cannot be imported in a process that imports `engine`; the
bench runs HF peft in a process of its own (bench/peers.py). A process that imported the other
`kernels` or `adapters` before `engine` is refused with one ImportError that says so.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

NAMES = ("kernels", "adapters")  # kernels first: adapters imports it
WHEEL_HOME = "_vit_forget_not"   # where a wheel install keeps them (setup.py's WHEEL_HOME)
_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds this engine/


def location(name: str) -> Path:
    """The folder of this project's package `name`: beside engine/ in a wheel's `_vit_forget_not/`,
    else beside engine/ itself (a clone, or an editable install of one)."""
    for folder in (_ROOT / WHEEL_HOME / name, _ROOT / name):
        if (folder / "__init__.py").is_file():
            return folder
    raise ImportError(f"this project's package {name!r} is not beside {_ROOT / 'engine'} (looked for "
                      f"{_ROOT / WHEEL_HOME / name} and {_ROOT / name}); reinstall vit-forget-not")


class _OwnPackageFinder(importlib.abc.MetaPathFinder):
    """Answers the top-level names in NAMES with this project's packages; submodules are then found
    through the package's own __path__, as usual."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in NAMES:
            return None
        folder = location(fullname)
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def pin() -> None:
    """Make `kernels` and `adapters` this project's for the rest of the process (idempotent);
    ImportError when another package of either name was imported first."""
    for name in NAMES:
        loaded = sys.modules.get(name)
        if loaded is None:
            continue
        where = getattr(loaded, "__file__", None)
        if where is None or Path(where).resolve().parent != location(name).resolve():
            raise ImportError(
                f"another package named {name!r} is already imported in this process ({where or loaded!r}); "
                f"vit-forget-not's {name} ({location(name)}) cannot share a process with it: run the code "
                f"that needs the other one (transformers and peft import Hugging Face's kernels) in a process "
                f"of its own, as bench/peers.py runs HF peft")
    if not any(isinstance(f, _OwnPackageFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OwnPackageFinder())
