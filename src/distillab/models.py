"""Where models come from: `lab:NAME` names a shipped lab checkpoint, anything else is an HF model directory.

Weights load as safetensors only, and never from a hub: a path that is not a local directory is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distillab.errors import UserError, one_line

LAB_CHECKPOINTS = Path(__file__).parent / "lab" / "checkpoints"


class ModelNotFound(UserError):
    """No model under the name: no such lab checkpoint, no such directory, or no config.json in it."""


class ModelUnusable(UserError):
    """A model directory that is there but cannot be used: its config, tokenizer or weights are missing, damaged,
    in a refused format or do not fit together."""


def resolve_model_path(name: str | Path) -> Path:
    name = str(name)
    if name.startswith("lab:"):
        path = LAB_CHECKPOINTS / name[len("lab:") :]
        if not (path / "config.json").is_file():
            shipped = sorted(p.name for p in LAB_CHECKPOINTS.glob("*") if (p / "config.json").is_file())
            raise ModelNotFound(
                f"no lab checkpoint {name!r}; shipped: {', '.join('lab:' + s for s in shipped) or 'none'}"
            )
        return path
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model directory not found: {path} (distillab loads local directories only)")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"not a Hugging Face model directory (no config.json): {path}")
    try:  # cheap, and every later failure on a garbage config.json would be a library traceback
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelUnusable(
            f"{path / 'config.json'} is not valid JSON ({err}): the model directory is damaged"
        ) from None
    if not isinstance(config, dict):
        raise ModelUnusable(f"{path / 'config.json'} is not a JSON object: not a Hugging Face model config")
    return path


def load_tokenizer(name: str | Path):
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:  # missing or broken tokenizer files
        raise ModelUnusable(
            one_line(
                f"cannot load a tokenizer from {path} ({type(err).__name__}: {err}): "
                "the directory needs the tokenizer files saved with the model"
            )
        ) from None
    if tok.pad_token is None:  # many causal LMs ship without one; batching needs it
        tok.pad_token = tok.eos_token
    return tok


def check_weights(path: Path) -> None:
    """Safetensors weights are present and their headers parse (reads headers only, not the tensors)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelUnusable(f"no .safetensors weights in {path} (other formats are refused)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors for a bad header
            raise ModelUnusable(
                one_line(f"{f}: unreadable safetensors file ({err}): the weights are damaged")
            ) from None


def check_model_dir(name: str | Path) -> Path:
    """Everything about a model directory that can be checked without loading its weights: config, tokenizer,
    weight headers. Stages call it before they write anything, so a bad directory leaves no half-made run."""
    path = resolve_model_path(name)
    load_tokenizer(path)
    check_weights(path)
    try:
        AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelUnusable(one_line(f"{path / 'config.json'}: not a usable model config ({err})")) from None
    return path


def load_model(
    name: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    attn_implementation: str | None = None,
):
    """attn_implementation: "sdpa", "eager", "flash_attention_2"; None leaves the model's own choice."""
    path = resolve_model_path(name)
    check_weights(path)
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, local_files_only=True, **attention
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # config and weights that do not fit together
        raise ModelUnusable(one_line(f"cannot load the model in {path} ({type(err).__name__}: {err})")) from None
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load(name: str | Path, **kwargs):
    return load_model(name, **kwargs), load_tokenizer(name)
