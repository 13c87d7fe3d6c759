"""Data stage: Ray Data reads a corpus, cleans and tokenizes it, packs documents into fixed-length sequences and
writes sharded parquet plus a manifest (``raygpt tokenize``); prompt/completion data for fine-tuning
(``raygpt tokenize-finetune``); and the readers the Train stage uses (:mod:`pipeline.data.reader`).
"""

from pipeline.data.errors import DataError

__all__ = ["DataError"]
