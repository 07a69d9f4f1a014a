"""Loading a Hub id (`kad.models.load_causal_lm`): a model in the local Hub cache loads offline and
with the Hub unreachable; one that is not cached fails at once, with a line saying what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LOAD = """
import torch
from kad.errors import ModelNotFoundError
from kad.models import load_causal_lm

model, _ = load_causal_lm("kadtest/tiny", dtype=torch.float32, device=torch.device("cpu"))
print("loaded", type(model).__name__)
try:
    load_causal_lm("kadtest/missing", dtype=torch.float32, device=torch.device("cpu"))
except ModelNotFoundError as err:
    print("error:", err)
"""


def hub_cache(root: Path, model_dir: Path) -> Path:
    """A Hub cache holding ``model_dir`` as the model kadtest/tiny (revision main)."""
    commit = "0" * 40
    repo = root / "models--kadtest--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_loads_from_the_cache_or_fails_at_once(tiny_dirs, tmp_path, offline):
    """Offline (HF_HUB_OFFLINE=1), and online with the Hub refusing connections (a closed port:
    huggingface_hub would retry with backoff for ~50 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HUB_CACHE"] = str(hub_cache(tmp_path / "hub", tiny_dirs.base))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    run = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "loaded LlamaForCausalLM"
    error = lines[1]
    assert error.startswith("error: model 'kadtest/missing': no such path, nor in the Hub cache")
    if offline:
        assert "HF_HUB_OFFLINE=1 is set: download it once online (`hf download" in error
    else:
        assert "the Hub (http://127.0.0.1:9) does not answer" in error
        assert "set HF_HUB_OFFLINE=1 to load cached models only, or give a local dir" in error
        assert "Retrying" not in run.stderr


def test_a_hub_id_that_is_no_id_says_so():
    import torch

    from kad.errors import ModelNotFoundError
    from kad.models import load_causal_lm

    with pytest.raises(ModelNotFoundError, match="'my model': no such path, nor a Hub id"):
        load_causal_lm("my model", dtype=torch.float32, device=torch.device("cpu"))
