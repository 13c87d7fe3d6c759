"""The model: the GPT-3 architecture in pure PyTorch (:mod:`.gpt`), its presets (:mod:`.presets`, GPT-3 Table 2.1)
and the GPT-2/GPT-3 byte-pair encoding (:mod:`.tokenizer`)."""
