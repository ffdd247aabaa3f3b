#!/usr/bin/env python3
"""Generate the Python protobuf / gRPC code of the FashionChameleon API. The only way to make it.

    python protos/generate.py           # regenerate protos/fashionchameleon/v1/*_pb2{,_grpc}.py(i)
    python protos/generate.py --check   # exit 1 if the committed files differ from a fresh run

Sources are `protos/fashionchameleon/v1/*.proto` (package `fashionchameleon.v1`), compiled with
`python -m grpc_tools.protoc -I protos --python_out --pyi_out --grpc_python_out` into `protos/`,
so the generated modules sit next to their sources and import each other package-absolute
(`from fashionchameleon.v1 import common_pb2`); `protos/` is the package root of `fashionchameleon`.

Output is deterministic for a given grpcio-tools / protobuf install (both pinned): protoc runs
into a temporary directory and its files are copied over the committed ones; generated files
whose .proto was deleted are removed. `--check` runs the same generation and compares instead
of copying, which is what CI does.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # the -I root and the python_out root
API_DIRS = ("fashionchameleon/v1",)  # proto packages, relative to PROTO_ROOT
PACKAGE_INITS = ("fashionchameleon/__init__.py", "fashionchameleon/v1/__init__.py")  # hand-written
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
MAX_DIFF_LINES = 40  # per file, in --check output


def proto_sources() -> list[str]:
    """The .proto files to compile, as sorted paths relative to PROTO_ROOT (POSIX separators)."""
    files = sorted(p.relative_to(PROTO_ROOT).as_posix() for d in API_DIRS for p in (PROTO_ROOT / d).glob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_ROOT} ({', '.join(API_DIRS)})")
    return files


def generated_files(root: Path) -> dict[str, Path]:
    """Generated files under `root`, keyed by their path relative to it."""
    found: dict[str, Path] = {}
    for d in API_DIRS:
        folder = root / d
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
                found[path.relative_to(root).as_posix()] = path
    return found


def run_protoc(out_dir: Path) -> None:
    """Compile every source into `out_dir` (which must exist)."""
    if importlib.util.find_spec("grpc_tools") is None:
        raise SystemExit(f"grpcio-tools is not installed for {sys.executable}; activate the project's venv")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",  # adds the well-known types (google/protobuf/*.proto) to the include path
        "-I.",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *proto_sources(),
    ]
    proc = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"protoc failed with exit code {proc.returncode}")


def tool_versions() -> str:
    """Versions that determine the output (printed when --check fails)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("grpcio-tools", "grpcio", "protobuf"):
        try:
            parts.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def write(fresh_root: Path) -> list[str]:
    """Copy the fresh files over the committed ones and delete stale ones; returns what changed."""
    fresh, committed = generated_files(fresh_root), generated_files(PROTO_ROOT)
    changed = []
    for rel, src in fresh.items():
        dst = PROTO_ROOT / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
            changed.append(f"wrote   {rel}")
    for rel, path in committed.items():
        if rel not in fresh:
            path.unlink()
            changed.append(f"removed {rel}")
    return changed


def compare(fresh_root: Path) -> list[str]:
    """Differences between the committed files and a fresh generation, as report lines."""
    fresh, committed = generated_files(fresh_root), generated_files(PROTO_ROOT)
    report = []
    for rel in PACKAGE_INITS:
        if not (PROTO_ROOT / rel).is_file():
            report.append(f"missing {rel} (package marker)")
    for rel in sorted(fresh.keys() - committed.keys()):
        report.append(f"missing {rel}")
    for rel in sorted(committed.keys() - fresh.keys()):
        report.append(f"stale   {rel} (no .proto generates it)")
    for rel in sorted(fresh.keys() & committed.keys()):
        new, old = fresh[rel].read_bytes(), committed[rel].read_bytes()
        if new == old:
            continue
        diff = list(
            difflib.unified_diff(
                old.decode("utf-8", "replace").splitlines(),
                new.decode("utf-8", "replace").splitlines(),
                f"committed/{rel}",
                f"generated/{rel}",
                lineterm="",
            )
        )
        report.append(f"differs {rel} ({len(diff)} diff lines)")
        report.extend("    " + line for line in diff[:MAX_DIFF_LINES])
        if len(diff) > MAX_DIFF_LINES:
            report.append(f"    ... {len(diff) - MAX_DIFF_LINES} more lines")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with a fresh generation instead of writing; exit 1 on any difference",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fc-protos-") as tmp:
        fresh_root = Path(tmp)
        run_protoc(fresh_root)
        if args.check:
            report = compare(fresh_root)
            if report:
                print("generated protobuf code is out of date:", file=sys.stderr)
                print("\n".join(report), file=sys.stderr)
                print(f"({tool_versions()}) fix: python protos/generate.py", file=sys.stderr)
                return 1
            print(f"generated protobuf code is up to date ({len(generated_files(fresh_root))} files)")
            return 0
        for rel in PACKAGE_INITS:
            if not (PROTO_ROOT / rel).is_file():
                raise SystemExit(f"missing package marker {rel}; it is hand-written, restore it from git")
        changed = write(fresh_root)
    print("\n".join(changed) if changed else "generated protobuf code already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
