"""FashionChameleon training: in-context teacher, teacher forcing, gradient-reweighted DMD.

    config.py            typed recipes (tiny, wan2.2-ti2v-5b) and overrides
    data/                preprocessing into latent shards, the shard format, the streaming reader
    models.py            TrainDiT (the shared DiT, FSDP-hookable), loading, fine-tuning modes
    flow.py              flow-matching pieces and keyed randomness
    teacher.py           stage 1 objective
    teacher_forcing.py   stage 2 objective (+ attention.py: dense / flex masked attention)
    dmd.py, rewards.py   stage 3 objective, frame rewards and weights
    trainer.py           the loops; parallel.py FSDP2; checkpointing.py DCP + resume; export.py
    metrics.py, memory.py, launch.py

See training/README.md.
"""
