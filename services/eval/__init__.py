"""HGC-Bench evaluation: generate every sample of a benchmark, score it, report it.

    bench.py      JSONL manifests (paths or object keys), chunk planning
    smoke.py      the procedurally generated smoke bench
    backends.py   where videos come from: the in-process Engine or a running Studio (gRPC)
    runner.py     bounded concurrency, per-sample result files, resume, progress bar
    metrics/      offline metrics (flow, identity, quality, learned models from local folders)
    judge.py      the VLM judge (OpenAI-compatible chat-completions or Gemini generateContent)
    scoring.py    runs the enabled metric groups; unavailable / missing / error, never skipped
    report.py     JSON, Markdown and self-contained HTML reports, stored in the object store
    compare.py    A vs B with regression gates (`fashionchameleon eval compare`)
    service.py    the Eval gRPC service (RunBenchmark, GetReport) as a Ray Serve class
    config.py     EvalConfig: runner, metrics, judge, tolerances

Run it from the CLI: `fashionchameleon eval run --bench smoke --preset tiny --out runs/smoke`.
"""
