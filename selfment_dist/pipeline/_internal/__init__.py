"""How the stages run on Ray (private to ``pipeline/``), one concept per module.

Run skeleton of the stages that write an output: ``run_output`` (the protocol, read once) over
``lease`` (one run per output, fencing), ``manifest`` (the run record), ``parts`` (atomic parquet
parts, resume by key, duplicates) and ``inputs`` (work units outside the output).
Model stages: ``decode`` (read + decode + resize, CPU tasks), ``model_stage`` (the two-stage
dataset, ``ActorResources``), ``label_actor`` and ``segment_actor`` (the replicas),
``saliency_output`` (segment's maps and rows), ``device`` (GPU faults), ``warm`` (model tasks
on warm workers), ``counters``, ``done_keys``, ``plan`` and ``ray_runtime`` (resources, Ray).
Training: ``train_data``, ``train_spec``, ``train_worker``, ``train_checkpoints``.
Evaluation: ``eval_merge``. Tests only: ``faults`` (fault injection and step dumps, env vars).
"""
