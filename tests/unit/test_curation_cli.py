"""`fashionchameleon curate`: flags + --config resolve into one CurationConfig; bad input is a CliError."""

from __future__ import annotations

import json

import pytest

from shared.cli import CliError, Parser
from training.curation import cli as curate


def _parse(argv):
    parser = Parser(prog="fashionchameleon")
    curate.register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return parser.parse_args(argv)


def test_dry_run_resolves_flags_over_config(tmp_path, capsys, monkeypatch):
    (tmp_path / "raw" / "sub").mkdir(parents=True)
    (tmp_path / "raw" / "sub" / "x.mp4").write_bytes(b"")
    (tmp_path / "raw" / "notes.txt").write_text("not a video")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"motion": {"min_magnitude": 2.0}, "vlm": {"model": "from-file", "frames": 4}}))
    monkeypatch.setenv("VLM_KEY", "sk-secret")
    args = _parse(["curate", "run", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                   "--config", str(config), "--vlm-url", "http://127.0.0.1:1/v1", "--vlm-model", "flag",
                   "--vlm-api-key-env", "VLM_KEY", "--edit-url", "http://127.0.0.1:2/v1", "--dry-run"])  # fmt: skip
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = out["config"]
    assert out["videos"] == 1
    assert cfg["vlm"]["model"] == "flag" and cfg["vlm"]["frames"] == 4 and cfg["motion"]["min_magnitude"] == 2.0
    assert cfg["try_on"]["base_url"] == cfg["try_off"]["base_url"] == "http://127.0.0.1:2/v1"
    assert "sk-secret" not in json.dumps(out)
    assert curate.build_config(args).vlm.api_key.get_secret_value() == "sk-secret"


def test_bad_input_is_a_cli_error(tmp_path):
    args = _parse(["curate", "run", "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--vlm-api-key-env", "FC_TEST_UNSET_VAR"])  # fmt: skip
    with pytest.raises(CliError, match="FC_TEST_UNSET_VAR"):
        args.run(args)
    args = _parse(["curate", "run", "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(CliError, match="vlm"):  # no endpoints configured: refused before starting Ray
        args.run(args)
    args = _parse(["curate", "export", "--out", str(tmp_path / "o"), "--to", str(tmp_path / "plain")])
    with pytest.raises(CliError, match="no finished run"):
        args.run(args)
