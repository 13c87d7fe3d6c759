"""Train stage: DeepSpeed ZeRO-3 pretraining and fine-tuning on Ray Train.

The driver side (:mod:`.driver`, :mod:`.plan`) validates and plans, runs Ray Train's TorchTrainer and summarizes;
each worker runs :func:`.worker.train_loop_per_worker`, built from :mod:`.deepspeed`, :mod:`.batches`,
:mod:`.checkpoint`, :mod:`.metrics` and :mod:`.evaluate`. :mod:`.consolidate` turns a ZeRO-3 checkpoint into an
export.
"""
