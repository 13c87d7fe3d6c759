"""Inference: the continuous-batching engine with a KV cache (:mod:`.engine`), what a sequence asks for and how a
token is drawn (:mod:`.sampling`) and what comes out (:mod:`.outputs`). Shared by serving, scoring and
``raygpt generate``; no HTTP, no Ray."""
