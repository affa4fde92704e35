"""bigray: train GPT (DeepSpeed ZeRO) and ResNets on Ray Train, search with Ray Tune, serve with Ray Serve.

Layers, bottom first; a module imports only from its own layer or below (checked with
``python ../shared/tools/import_graph.py bigray --layers "<the line below>"``)::

    models.families | config | models | artifacts cluster | serve | data | train | recipes | tune export smoke | quickstart cli

- ``models.families``: the decoder family registry (presets, config builders, FLOPs); pure data, so
  the config validates against it.
- ``config``: every job's typed sections (pydantic dataclasses) and the one loader (YAML + ``--set``)
  for them and for Serve's settings.
- ``models``: plain single-device torch models (nothing of Ray or DeepSpeed).
- ``artifacts``: the formats every side reads, local path or URI: checkpoint directories and their
  completeness, run directories and summaries, experiment tracking (MLflow / W&B), locating a
  checkpoint, the GPT Hugging Face format, the ResNet model card. ``cluster``: connecting to Ray,
  waiting for the workers' resources, the torch device and its precision.
- ``serve``: settings, protocol, runners, deployments, serving (admission, collecting, streaming),
  ingress (routes, auth), app builder; it reads artifacts and
  never imports data, train or recipes.
- ``data``: corpus, tokenizer, token shards, fine-tuning data, image datasets (built on the driver).
- ``train``: the worker side only: loops, context, metrics, optimizer/schedules, and engine.py, which
  owns every DeepSpeed/ZeRO decision.
- ``recipes``: the driver side: check the job against the cluster (preflight), open and check the
  base model, prepare once, launch, summarize; one registry of job kinds.
- ``tune``, ``export``, ``smoke`` (`bigray cluster smoke`), ``quickstart``, ``cli``: commands built
  from the layers below.
"""
