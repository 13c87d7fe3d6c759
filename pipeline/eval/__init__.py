"""Few-shot evaluation with lm-evaluation-harness: raygpt's shipped tasks and how to hand them to lm-eval."""
