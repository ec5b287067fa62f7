"""Load a causal LM and its tokenizer: a packaged default name, a local directory, or an HF id."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvstore.config import Settings
from kvstore.engine.attention import ATTENTION_NAME
from kvstore.engine.locate import PACKAGED_MODELS, ModelNotFoundError, PackagedModel, locate, packaged_dir
from kvstore.kv.shape import MAX_TOKENS, KVShape
from kvstore.text.prompt import ChatFrame

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for kvstore: attention routed through our ragged-cache function."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    tokenizer_fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def frame(self) -> ChatFrame:
        """The chat template split around the user content, rendered once per model."""
        return ChatFrame.for_tokenizer(self.tokenizer)

    @cached_property
    def kv_shape(self) -> KVShape:
        """This model's cache geometry, window and vocabulary: what a stored context must match to be used."""
        config = self.model.config.get_text_config()
        heads = config.num_attention_heads
        return KVShape(
            layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            window=getattr(config, "max_position_embeddings", None) or MAX_TOKENS,
            vocab=max(config.vocab_size, len(self.tokenizer)),
        )


def resolve_device(device: str) -> torch.device:
    """ "auto" is CUDA when available; a named device that this machine lacks is refused in one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ModelNotFoundError(f"device {device!r} (KVSTORE_DEVICE): CUDA is not available on this machine")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ModelNotFoundError(f"device {device!r} (KVSTORE_DEVICE): MPS is not available on this machine")
    return chosen


def convert_packaged(name: str, cache_dir: Path) -> Path:
    """Convert a packaged GGUF once to a safetensors directory; later loads take seconds."""
    spec = PACKAGED_MODELS[name]
    target = cache_dir / name
    if (target / "config.json").exists():
        return target
    source = packaged_dir(spec)
    log.info("converting %s from GGUF (one-time, ~30 s)", name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = spec.hf_id
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


# Config entries that say how the weights were loaded, not which weights they are.
_LOAD_ONLY_CONFIG = ("dtype", "torch_dtype")


def _fingerprint_weights(model: PreTrainedModel) -> str:
    """Cheap but content-sensitive: hash config plus a strided sample of every parameter.

    It names the weights, not the dtype they were loaded in (a context prefilled by a bfloat16 GPU
    worker serves a float32 CPU client): the load dtype is left out of the config and every sample
    is rounded to bfloat16 first, which a float32 and a bfloat16 load of the same weights agree on.
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in _LOAD_ONLY_CONFIG}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].to(torch.bfloat16).to(torch.float32).cpu().numpy()
        digest.update(name.encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def _fingerprint_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


def load_model(name: str | None = None, settings: Settings | None = None) -> LoadedModel:
    """Load model + tokenizer in eval mode with kvstore's attention function installed."""
    settings = settings or Settings()
    name = name or settings.model
    location = locate(name)
    if isinstance(location, PackagedModel):
        location = convert_packaged(name, settings.model_cache_dir)
    device = resolve_device(settings.device)
    if settings.dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        dtype = getattr(torch, settings.dtype)
    offline = isinstance(location, str) and try_to_load_from_cache(location, "config.json") is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=offline)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {name!r}: {exc}") from exc
    return prepare_model(name, model, tokenizer, device)


def prepare_model(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Route attention through kvstore and fingerprint weights; also used for in-memory test models."""
    model = model.to(device).eval()
    model.set_attn_implementation(ATTENTION_NAME)
    return LoadedModel(name, model, tokenizer, _fingerprint_weights(model), _fingerprint_tokenizer(tokenizer))
