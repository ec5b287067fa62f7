"""Settings shared by the library, the CLI and the workers: one typed object, validated once.

Every field reads its env var (see README) unless given; `__post_init__` checks and converts all
of them, so a bad value fails where it enters (a flag, an env var, a task message) with one line
naming the setting. Importing this module loads no torch.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvstore.errors import InputError

DEFAULT_MODEL = "smollm2-135m"
QUANT_BITS: dict[str, int | None] = {"none": None, "int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 32  # quantization group (rows or channels sharing a scale)
BLOB_FORMATS = ("safetensors", "zarr")
# Decode kernels by name (kvstore.decode.kernels registers them; a test checks the two agree).
DECODE_KERNELS = ("auto", "loop", "fused", "masked")
# Floating types of the model's weights and of the stored K/V ("auto": bfloat16 on CUDA, float32 elsewhere
# for the model; the model's own for storage). A context moves between them: loads cast as needed. Not
# float16 weights: the weights fingerprint agrees between float32 and bfloat16 loads only.
MODEL_DTYPES = ("auto", "float32", "bfloat16")
STORAGE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")
ENV_VARS = {
    "home": "KVSTORE_HOME",
    "redis_url": "KVSTORE_REDIS_URL",
    "blobs": "KVSTORE_BLOBS",
    "model": "KVSTORE_MODEL",
    "press": "KVSTORE_PRESS",
    "ratio": "KVSTORE_RATIO",
    "quant": "KVSTORE_QUANT",
    "blob_format": "KVSTORE_FORMAT",
    "device": "KVSTORE_DEVICE",
    "dtype": "KVSTORE_DTYPE",
    "storage_dtype": "KVSTORE_STORAGE_DTYPE",
    "kernel": "KVSTORE_KERNEL",
    "max_document_mb": "KVSTORE_MAX_DOCUMENT_MB",
}


def bits_for(quant: str) -> int | None:
    """Bits of a named quantization ('none' -> None); a clear error for unknown names."""
    if quant not in QUANT_BITS:
        raise ValueError(f"unknown quantization {quant!r}: choose one of {', '.join(QUANT_BITS)}")
    return QUANT_BITS[quant]


class SettingsError(InputError):
    """A setting has a value kvstore cannot use; the message names the setting and its env var."""


def _env(name: str, default: str | None = None) -> Any:
    return lambda: os.environ.get(ENV_VARS[name]) or default


def _label(name: str) -> str:
    return f"{name} ({ENV_VARS[name]})" if name in ENV_VARS else name


def check_ratio(value: object, name: str = "ratio") -> float:
    """A compression ratio as a float in [0, 1): the fraction of KV pairs (or key channels) removed."""
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(f"{_label(name)}: expected a number in [0, 1), got {value!r}") from None
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise SettingsError(f"{_label(name)}: {value!r} is not in [0, 1) (the fraction of KV pairs removed)")
    return ratio


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(f"{_label(name)}: unknown value {value!r}, choose one of {', '.join(choices)}")
    return str(value)


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{_label(name)}: expected a non-empty string, got {value!r}")
    return value.strip()


def _check_blobs(value: object) -> str | None:
    """A blobs location: None (the home's folder), a folder path, file:// or s3://bucket[/prefix]."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme not in ("", "file", "s3") or (scheme == "s3" and not text[len("s3://") :].split("/", 1)[0]):
        raise SettingsError(f"{_label('blobs')}: {value!r} is not a folder, file:// or s3://bucket/prefix URL")
    return text


@dataclass(frozen=True)
class Compression:
    """How a document is compressed and stored, as a task message carries it: None = the receiver's default."""

    model: str | None = None
    press: str | None = None
    ratio: float | None = None
    quant: str | None = None
    blob_format: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "press"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_text(name, getattr(self, name)))
        if self.ratio is not None:
            object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.quant is not None:
            _check_choice("quant", self.quant, tuple(QUANT_BITS))
        if self.blob_format is not None:
            _check_choice("blob_format", self.blob_format, BLOB_FORMATS)

    def to_dict(self) -> dict[str, Any]:
        """The fields that were chosen (JSON-ready)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Compression:
        """Parse a task message's settings: unknown keys are refused, values validated."""
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            allowed = ", ".join(f.name for f in fields(cls))
            raise SettingsError(f"settings {unknown} cannot be set per document (allowed: {allowed})")
        return cls(**raw)


@dataclass(frozen=True)
class Settings:
    """Where things live and which defaults apply; every field has an env var (see README)."""

    home: Path = field(default_factory=_env("home"))  # type: ignore[assignment]
    redis_url: str | None = field(default_factory=_env("redis_url"), repr=False)  # it may hold a password
    blobs: str | None = field(default_factory=_env("blobs"))  # None: KVSTORE_HOME/blobs; a folder or s3://bucket/prefix
    model: str = field(default_factory=_env("model", DEFAULT_MODEL))
    press: str = field(default_factory=_env("press", "kvzip"))
    ratio: float = field(default_factory=_env("ratio", "0.75"))
    quant: str = field(default_factory=_env("quant", "none"))
    blob_format: str = field(default_factory=_env("blob_format", "safetensors"))
    device: str = field(default_factory=_env("device", "auto"))
    dtype: str = field(default_factory=_env("dtype", "auto"))  # the model's weights and compute
    storage_dtype: str = field(default_factory=_env("storage_dtype", "auto"))  # stored K/V; auto: the model's
    kernel: str = field(default_factory=_env("kernel", "auto"))  # decode kernel: auto = the best measured per device
    max_document_mb: float = field(default_factory=_env("max_document_mb", "50"))  # a document's size cap

    def __post_init__(self) -> None:
        home = self.home if self.home not in (None, "") else Path.home() / ".kvstore"
        object.__setattr__(self, "home", Path(home).expanduser())
        object.__setattr__(self, "redis_url", self.redis_url or None)
        object.__setattr__(self, "blobs", _check_blobs(self.blobs))
        for name in ("model", "press"):
            object.__setattr__(self, name, _check_text(name, getattr(self, name)))
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        _check_choice("quant", self.quant, tuple(QUANT_BITS))
        _check_choice("blob_format", self.blob_format, BLOB_FORMATS)
        _check_choice("kernel", self.kernel, DECODE_KERNELS)
        _check_choice("dtype", self.dtype, MODEL_DTYPES)
        _check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        try:
            size = float(self.max_document_mb)
        except (TypeError, ValueError):
            size = float("nan")
        if not math.isfinite(size) or size <= 0:
            raise SettingsError(f"{_label('max_document_mb')}: expected a size in MB > 0, got {self.max_document_mb!r}")
        object.__setattr__(self, "max_document_mb", size)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise SettingsError(f"{_label('device')}: {self.device!r} is not a device (auto, cpu, cuda, cuda:N, mps)")

    @property
    def model_cache_dir(self) -> Path:
        """Converted model weights live here (shared across stores unless KVSTORE_MODEL_CACHE is set)."""
        value = os.environ.get("KVSTORE_MODEL_CACHE")
        return Path(value).expanduser() if value else Path.home() / ".cache" / "kvstore" / "models"

    @property
    def max_document_bytes(self) -> int:
        """The size cap in bytes: a larger file is refused before it is read, so one stray file cannot fill memory."""
        return int(self.max_document_mb * 2**20)

    @property
    def compression(self) -> Compression:
        """This side's full compression choice (what `kvstore submit` sends is only what was given)."""
        return Compression(self.model, self.press, self.ratio, self.quant, self.blob_format)

    def with_overrides(self, **overrides: object) -> Settings:
        """Apply flags on top of these settings; None means 'not given'. Unknown names are refused."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_compression(self, compression: Compression) -> Settings:
        """These settings with a task's (or a caller's) compression choice on top."""
        return self.with_overrides(**compression.to_dict())
