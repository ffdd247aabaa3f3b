"""Batch clip jobs: workers (worker.py), the Studio RPCs (api.py), the manifest and client of
the `fashionchameleon batch` CLI. See README.md."""
