"""Where models come from: `lab:NAME` names a shipped lab checkpoint, anything else is an HF model directory.

Weights load as safetensors only, and never from a hub: a path that is not a local directory is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillab.errors import UserError

LAB_CHECKPOINTS = Path(__file__).parent / "lab" / "checkpoints"


class ModelNotFound(UserError):
    pass


def resolve_model_path(name: str | Path) -> Path:
    name = str(name)
    if name.startswith("lab:"):
        path = LAB_CHECKPOINTS / name[len("lab:") :]
        if not (path / "config.json").is_file():
            shipped = sorted(p.name for p in LAB_CHECKPOINTS.glob("*") if (p / "config.json").is_file())
            raise ModelNotFound(f"no lab checkpoint {name!r}; shipped: {', '.join('lab:' + s for s in shipped) or 'none'}")
        return path
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model directory not found: {path} (distillab loads local directories only)")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"not a Hugging Face model directory (no config.json): {path}")
    return path


def load_tokenizer(name: str | Path):
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(name)), local_files_only=True)
    if tok.pad_token is None:  # many causal LMs ship without one; batching needs it
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    path = resolve_model_path(name)
    if not any(path.glob("*.safetensors")):
        raise ModelNotFound(f"no .safetensors weights in {path} (other formats are refused)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True, local_files_only=True)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load(name: str | Path, **kwargs):
    return load_model(name, **kwargs), load_tokenizer(name)
