"""The built-in world: a tiny base / proxy-base / aligned-proxy family on arithmetic word problems.

``builtin_paths()`` gives the shipped model directories (``src/kad/assets``),
``builtin_aligner()`` loads them as a `kad.Aligner`,
``heldout_problems(n, split)`` the problems no model was trained on, ``score(text, answer)``
the exact-match check of a ``#### <answer>`` line. ``BASE_TEMPLATE`` is how the base sees a
question (web text); the aligned proxy uses its chat template. See ``assets/MODEL_CARD.md``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kad.errors import ModelNotFoundError
from kad.world.generator import extract_answer, heldout_problems, score
from kad.world.tokenizer import BASE_TEMPLATE

if TYPE_CHECKING:
    from kad.aligner import Aligner

__all__ = [
    "BASE_TEMPLATE",
    "BuiltinPaths",
    "builtin_aligner",
    "builtin_paths",
    "extract_answer",
    "heldout_problems",
    "score",
]


class BuiltinPaths(NamedTuple):
    """The shipped model directories: base p, aligned proxy q*, proxy base q."""

    base: Path
    proxy: Path
    proxy_base: Path


def builtin_paths() -> BuiltinPaths:
    """Paths of the built-in models inside the installed package."""
    root = Path(str(files("kad") / "assets"))
    paths = BuiltinPaths(root / "base", root / "proxy", root / "proxy_base")
    for path in paths:
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"the built-in model {path.name!r} is missing from {root}; "
                "reinstall kad-align or rebuild it with `python -m kad.world.train`"
            )
    return paths


def builtin_aligner(*, proxy_base: bool | str = True, **kwargs: Any) -> Aligner:
    """The built-in pair as an `Aligner`, the base reading questions as web text
    (``BASE_TEMPLATE``). proxy_base: load the shipped proxy base (True), none (False), or another
    model (a path). ``kwargs`` go to `Aligner.from_pretrained` (device, dtype, fast, ...)."""
    from kad.aligner import Aligner

    paths = builtin_paths()
    third = paths.proxy_base if proxy_base is True else (proxy_base or None)
    return Aligner.from_pretrained(
        paths.base, paths.proxy, third, base_template=BASE_TEMPLATE, **kwargs
    )
