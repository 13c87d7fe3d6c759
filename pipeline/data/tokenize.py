"""The tokenize stage: a callable class for Ray Data ``map_batches`` (the encoding is loaded once per actor).

Each document becomes its BPE ids followed by ``<|endoftext|>`` (special-token strings inside the text are encoded
as ordinary text). Summary rows pass through with no tokens. Output columns: ``file_index``, ``doc_index``,
``split``, ``kind``, ``tokens`` (a list of ids per row, in :func:`token_dtype`) and ``info`` (the summary JSON of
summary rows, else null).

Ray Data hands the actor blocks of up to its target block size (128 MiB by default: the documents of one large
file come in such blocks), and the Python strings and the joined text of an encoder call take several times the
block's bytes; so a block is encoded ``ENCODE_BYTES`` of text at a time, which bounds the actor's working memory by
that, not by the block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.documents import KIND_DOCUMENT
from pipeline.model.tokenizer import Tokenizer, get_tokenizer

ENCODE_BYTES = 8 << 20  # UTF-8 bytes of documents per encoder call (a longer document is one call of its own)


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 while every id fits (GPT-2/GPT-3's 50257 do), else int32."""
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.int32)


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of all documents (each followed by <|endoftext|>) and the per-document lengths."""
    dtype = token_dtype(tokenizer.n_vocab)
    joined = _encode_joined(tokenizer, texts)
    if joined is not None:
        return joined.astype(dtype, copy=False), np.diff(np.flatnonzero(joined == tokenizer.eot_id), prepend=-1)
    encoded = [tokenizer.encoding.encode_ordinary(text) for text in texts]
    eot = tokenizer.eot_id
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    position = 0
    for ids, length in zip(encoded, lengths, strict=True):
        flat[position : position + length - 1] = ids
        flat[position + length - 1] = eot
        position += length
    return flat, lengths


def _encode_joined(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray | None:
    """All documents in one encoder call: ``doc<|endoftext|>doc<|endoftext|>...`` with the special token allowed.

    tiktoken encodes the text between special tokens piece by piece, so this equals encoding each document alone
    and appending the id, without a call per document. That matters: each call releases the GIL, and with another
    thread in the process (a Ray Data actor has some) every reacquisition can wait a switch interval, which made
    a corpus of speeches tokenize at half the speed of the same text as whole files. Not possible (None) when a
    document contains the special token's text, which must stay ordinary text, or the encoding lacks the call.
    """
    encoding = tokenizer.encoding
    special = encoding.decode([tokenizer.eot_id])
    if not texts or not hasattr(encoding, "encode_to_numpy") or any(special in text for text in texts):
        return None
    return encoding.encode_to_numpy(special.join(texts) + special, allowed_special={special}, disallowed_special=())


class TokenizeDocuments:
    """Ray Data actor: document rows (pyarrow) to token rows. One encoding load per actor."""

    def __init__(self, tokenizer_name: str, tokenizer_file: str | None = None) -> None:
        self.tokenizer = get_tokenizer(tokenizer_name, tokenizer_file)
        self.value_type = pa.from_numpy_dtype(token_dtype(self.tokenizer.n_vocab))

    def __call__(self, batch: pa.Table) -> pa.Table:
        is_doc = batch.column("kind").to_numpy() == KIND_DOCUMENT
        lengths = np.zeros(len(batch), np.int64)
        flats = [np.empty(0, token_dtype(self.tokenizer.n_vocab))]
        info: list[str | None] = []
        for start, stop in text_slices(batch.column("text"), ENCODE_BYTES):
            texts = batch.column("text").slice(start, stop - start).to_pylist()
            docs = is_doc[start:stop]
            flat, doc_lengths = encode_documents(self.tokenizer, [t for t, d in zip(texts, docs, strict=True) if d])
            lengths[start:stop][docs] = doc_lengths
            flats.append(flat)
            info.extend(None if d else t for t, d in zip(texts, docs, strict=True))
        offsets = np.zeros(len(batch) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(np.concatenate(flats), self.value_type)
        tokens = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
        return pa.table(
            {
                "file_index": batch.column("file_index"),
                "doc_index": batch.column("doc_index"),
                "split": batch.column("split"),
                "kind": batch.column("kind"),
                "tokens": tokens,
                "info": pa.array(info, pa.large_string()),
            }
        )


def text_slices(texts: pa.ChunkedArray | pa.Array, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges ``[start, stop)`` covering ``texts``, each of at most ``budget`` UTF-8 bytes of text
    unless one row alone has more."""
    sizes = pc.fill_null(pc.binary_length(texts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(sizes)
    slices = []
    start = 0
    while start < len(sizes):
        done = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, done + budget, side="right")), start + 1)
        slices.append((start, stop))
        start = stop
    return slices
