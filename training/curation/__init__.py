"""Data curation (paper App. A): raw videos -> (reference, garment, video, caption) triplets.

    from training.curation.config import CurationConfig
    from training.curation.pipeline import run
    result = run(CurationConfig(input=..., output=..., vlm=..., try_off=..., try_on=...))

Stages (stages.py), on Ray Data (pipeline.py), with a report (report.py); the output's
manifest.jsonl is the input of `training.data.preprocess`. CLI: `fashionchameleon curate`.
"""
