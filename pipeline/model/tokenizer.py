"""GPT-2/GPT-3 byte-pair encoding through tiktoken, loaded offline and hash-verified.

``r50k_base`` (the GPT-2 and GPT-3 vocabulary) ships inside the package. Other tiktoken encodings
(``cl100k_base``, ``o200k_base``, ...) work when their ``.tiktoken`` file is available locally: pass its path,
or put it in ``$RAYGPT_TOKENIZER_DIR``. The file's sha256 must match the hash tiktoken itself pins. Nothing is
ever downloaded. Each encoding is loaded once per process.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken_ext.openai_public as openai_public

DEFAULT_ENCODING = "r50k_base"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256  # <|endoftext|> in r50k_base
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER_DIR_ENV = "RAYGPT_TOKENIZER_DIR"
_patch_lock = threading.Lock()
# tiktoken's "gpt2" builds the same ranks as r50k_base from two other files; serve it from the shipped one.
ALIASES = {"gpt2": "r50k_base"}


class TokenizerError(RuntimeError):
    """The tokenizer file is missing, unknown or does not match its pinned hash."""


@dataclass(frozen=True)
class Tokenizer:
    """A loaded encoding plus what an artifact must record to be reproduced."""

    encoding: tiktoken.Encoding
    name: str
    sha256: str
    path: str

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "n_vocab": self.n_vocab, "eot_id": self.eot_id}

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in the text are treated as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Text to ids where special-token strings (``<|endoftext|>``) are those tokens: how OpenAI's API and
        Hugging Face tokenizers read a prompt. Training data never goes through this (:meth:`encode`)."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str], num_threads: int = 4) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def decode_batch(self, batch: Sequence[Sequence[int]], num_threads: int = 4) -> list[str]:
        return self.encoding.decode_batch([list(ids) for ids in batch], errors="replace", num_threads=num_threads)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))


def _locate(filename: str, explicit: str | os.PathLike[str] | None) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        return path
    searched = []
    env_dir = os.environ.get(TOKENIZER_DIR_ENV)
    for folder in ([Path(env_dir)] if env_dir else []) + [ASSETS_DIR]:
        candidate = folder / filename
        searched.append(str(candidate))
        if candidate.is_file():
            return candidate
    raise TokenizerError(
        f"tokenizer file {filename!r} not found (looked in: {', '.join(searched)}); raygpt never downloads it: "
        f"copy it there, point ${TOKENIZER_DIR_ENV} at its folder, or set data.tokenizer_file"
    )


def _parse_bpe(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except ValueError as exc:
        raise TokenizerError(f"tokenizer file {str(path)!r} is not in tiktoken's format: {exc}") from exc
    return ranks


def get_tokenizer(name: str = DEFAULT_ENCODING, path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Encoding ``name`` from a local file, verified against the sha256 tiktoken pins; loaded once per process."""
    return _load(ALIASES.get(name, name), None if path is None else str(path))


def clear_cache() -> None:
    """Forget loaded encodings (e.g. after changing $RAYGPT_TOKENIZER_DIR)."""
    _load.cache_clear()


@cache
def _load(name: str, path: str | None) -> Tokenizer:
    constructor = openai_public.ENCODING_CONSTRUCTORS.get(name)
    if constructor is None:
        known = ", ".join(sorted(set(openai_public.ENCODING_CONSTRUCTORS) | set(ALIASES)))
        raise TokenizerError(f"unknown tiktoken encoding {name!r}; known: {known}")
    loaded: dict[str, Any] = {}

    def load_local(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        # tiktoken's constructors describe each encoding (pattern, special tokens, pinned hash) and fetch the
        # rank file by URL; we feed them the local file instead, after checking it against the pinned hash.
        file = _locate(url.rsplit("/", 1)[-1], path)
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if expected_hash and digest != expected_hash:
            raise TokenizerError(
                f"tokenizer file {str(file)!r} has sha256 {digest}, expected {expected_hash} for {name}: "
                "the file is corrupt or belongs to another encoding"
            )
        loaded.update(path=str(file), sha256=digest)
        return _parse_bpe(data, file)

    def refuse_download(*_args: Any, **_kwargs: Any) -> dict[bytes, int]:
        raise TokenizerError(f"encoding {name!r} needs files raygpt cannot load offline")

    with _patch_lock:
        saved = openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks
        openai_public.load_tiktoken_bpe = load_local
        openai_public.data_gym_to_mergeable_bpe_ranks = refuse_download
        try:
            spec = constructor()
        finally:
            openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = saved
    spec.pop("explicit_n_vocab", None)
    encoding = tiktoken.Encoding(**spec)
    return Tokenizer(encoding=encoding, name=name, sha256=loaded["sha256"], path=loaded["path"])
