"""Exports: the format every stage agrees on (:mod:`.format`) and Hugging Face GPT-2 both ways (:mod:`.hf`).
Training writes exports (:mod:`pipeline.train.consolidate`); fine-tuning, serving and scoring read them."""
