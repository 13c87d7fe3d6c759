"""The Hugging Face tokenizer of a tiktoken encoding, built offline from the rank file raygpt ships.

transformers' ``TikTokenConverter`` turns the ranks into a byte-level BPE ``tokenizers`` model with the encoding's
own split pattern, which encodes exactly as tiktoken does (tests/export/test_hf.py checks ids on a hard corpus).
Special-token strings in text are those tokens, as in OpenAI's API and raygpt's endpoint. The chat template is
the one the chat route renders.
"""

from __future__ import annotations

from typing import Any

from pipeline.model.chat import CHAT_TEMPLATE_JINJA
from pipeline.model.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def hf_tokenizer(tokenizer: Tokenizer, context_length: int) -> Any:
    """A ``PreTrainedTokenizerFast`` equal to ``tokenizer`` (GPT-2's conventions: no BOS/EOS added)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = tokenizer.encoding
    specials = sorted(encoding.special_tokens_set, key=encoding.encode_single_token)
    converter = TikTokenConverter(vocab_file=tokenizer.path, pattern=encoding._pat_str, extra_special_tokens=specials)
    eos = EOT if EOT in specials else None
    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        eos_token=eos,
        bos_token=eos,
        unk_token=eos,
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE_JINJA,
    )
