"""`buf lint` and `buf breaking` (protos/buf.yaml) as .ci/run runs them, and proof that the
breaking check fails on incompatible changes to the released API (protos/releases/).

buf is the @bufbuild/buf npm package of tests/interop/node (`npm ci --prefix tests/interop/node`);
without it these tests skip, except in CI (.ci/run installs it and sets CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
BASELINE = PROTOS / "releases" / "v1-0.1.0.binpb"
BUF = ROOT / "tests" / "interop" / "node" / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> str:
    if not BUF.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{BUF} is missing: .ci/run installs it with npm ci --prefix tests/interop/node")
        pytest.skip("buf is not installed (npm ci --prefix tests/interop/node)")
    return str(BUF)


def run_buf(buf: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def protos_copy(tmp_path) -> Path:
    """The API sources and buf.yaml, without generated code, in a scratch directory."""
    dest = tmp_path / "protos"
    shutil.copytree(
        PROTOS / "fashionchameleon", dest / "fashionchameleon", ignore=shutil.ignore_patterns("*.py", "*.pyi")
    )
    shutil.copy(PROTOS / "buf.yaml", dest / "buf.yaml")
    return dest


def breaking(buf: str, protos: Path) -> subprocess.CompletedProcess:
    return run_buf(buf, "breaking", str(protos), "--against", str(BASELINE), "--error-format", "json")


def rules(r: subprocess.CompletedProcess) -> set[str]:
    """The rule ids of buf's findings (--error-format json: one JSON object a line)."""
    return {json.loads(line)["type"] for line in r.stdout.splitlines() if line.strip()}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path.name}"
    path.write_text(text.replace(old, new))


def test_protos_pass_buf_lint(buf):
    r = run_buf(buf, "lint", "protos")
    assert r.returncode == 0, r.stdout + r.stderr


def test_lint_exceptions_are_exactly_the_frozen_v1_names(buf, protos_copy):
    """Without its `except` list, STANDARD finds only the names v1 cannot change."""
    config = protos_copy / "buf.yaml"
    text = config.read_text()
    config.write_text(re.sub(r"  except:\n(    - [A-Z_]+\n)+", "", text))
    r = run_buf(buf, "lint", str(protos_copy), "--error-format", "json")
    assert r.returncode != 0
    assert rules(r) == {
        "SERVICE_SUFFIX",
        "RPC_RESPONSE_STANDARD_NAME",
        "RPC_REQUEST_RESPONSE_UNIQUE",
        "ENUM_VALUE_PREFIX",
    }


def test_current_protos_are_compatible_with_the_release(buf):
    r = breaking(buf, PROTOS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_added_field_is_compatible(buf, protos_copy):
    edit(
        protos_copy / "fashionchameleon/v1/studio.proto",
        "  string session_id = 20;\n",
        "  string session_id = 20;\n  string note_for_test = 999;\n",
    )
    r = breaking(buf, protos_copy)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ("  string session_id = 20;\n", "", "FIELD_NO_DELETE"),  # VideoChunk.session_id deleted
        ("  bytes fmp4 = 2;\n", "  bytes fmp4 = 21;\n", "FIELD_NO_DELETE"),  # field number changed
        ("  double fps = 7;\n", "  float fps = 7;\n", "FIELD_SAME_TYPE"),
        ("  rpc CloseSession(CloseSessionRequest) returns (CloseSessionResponse);\n", "", "RPC_NO_DELETE"),
    ],
    ids=["delete-field", "renumber-field", "change-type", "delete-rpc"],
)
def test_buf_breaking_catches_an_incompatible_change(buf, protos_copy, old, new, rule):
    edit(protos_copy / "fashionchameleon/v1/studio.proto", old, new)
    r = breaking(buf, protos_copy)
    assert r.returncode != 0, "buf breaking accepted an incompatible change"
    assert rule in rules(r), r.stdout + r.stderr
