"""The `reid` command for a new user: one-line errors with a non-zero status instead of tracebacks, REID_URL and
REID_API_KEY as defaults, every option described in --help, every command in the README's table."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from index.redis_server import free_port
from scripts.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_is_described():
    undescribed = [f"reid {name} {action.option_strings or action.dest}"
                   for name, parser in _subcommands().items() for action in parser._actions
                   if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert undescribed == []


def test_refine_choices_are_the_refiners_modes():
    from index.refine import MODES
    from scripts.cli import CANDIDATE_MODES, REFINE_MODES
    from service.settings import RefineMode

    assert REFINE_MODES == list(MODES)
    assert CANDIDATE_MODES == [m.value for m in RefineMode if m.refines_candidates]
    choices = {name: next(a.choices for a in parser._actions if a.dest == "refine")
               for name, parser in _subcommands().items() if name in ("evaluate", "search")}
    assert choices == {"evaluate": list(MODES), "search": [*MODES, "auto"]}


def test_the_readme_table_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Command line: `reid`"):]
    section = section[:section.index("\n## ", 1)]
    listed = set(re.findall(r"^\| `reid ([a-z-]+)", section, flags=re.M))
    assert listed == set(_subcommands())


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def _one_line(done: subprocess.CompletedProcess, code: int = 1) -> str:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr.strip()


def test_errors_are_one_line_and_a_non_zero_status(server_factory, image_bytes, tmp_path):
    query = tmp_path / "q.png"
    query.write_bytes(image_bytes(1))
    nobody = f"http://127.0.0.1:{free_port()}"

    # a separate process, as a user runs it: connection refused, a missing file, bad arguments
    line = _one_line(_run(["search", str(query), "--gallery", "g", "--url", nobody]))
    assert line.startswith("reid search: cannot reach the service at " + nobody)
    line = _one_line(_run(["search", str(tmp_path / "missing.png"), "--gallery", "g", "--url", nobody]))
    assert line == f"reid search: {tmp_path / 'missing.png'}: No such file or directory"
    _one_line(_run(["ingest", "--gallery", "g", "--folder", str(tmp_path / "none"), "--url", nobody]))
    assert _run(["search", str(query)]).returncode == 2  # --gallery missing: argparse's usage message
    # a local command: a bundle that is not there
    line = _one_line(_run(["evaluate", "--bundle", str(tmp_path / "nope"), "--data", "prid2011"]))
    assert line == f"reid evaluate: model bundle directory not found: {tmp_path / 'nope'}"

    base = server_factory(api_key="secret").url
    line = _one_line(_run(["search", str(query), "--gallery", "g"], env={"REID_URL": base}))
    assert line.startswith("reid search: HTTP 401 unauthorized:")
    line = _one_line(_run(["search", str(query), "--gallery", "g"], env={"REID_URL": base, "REID_API_KEY": "wrong"}))
    assert "HTTP 401" in line
    done = _run(["search", str(query), "--gallery", "nowhere", "--url", base], env={"REID_API_KEY": "secret"})
    assert _one_line(done).startswith("reid search: HTTP 404 gallery_not_found:")


def test_env_defaults_and_a_round_trip(server_factory, image_bytes, tmp_path, monkeypatch, capsys):
    base = server_factory(api_key="secret").url
    folder = tmp_path / "cams"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i:04d}_c{1 + i % 2}s1_000001_00.png").write_bytes(image_bytes(i))
    monkeypatch.setenv("REID_URL", base)
    monkeypatch.setenv("REID_API_KEY", "secret")
    args = build_parser().parse_args(["search", "x.png", "--gallery", "g"])
    assert (args.url, args.api_key) == (base, "secret")

    assert main(["ingest", "--gallery", "lobby", "--folder", str(folder)]) == 0
    assert "4 stored (4 new), 0 errors" in capsys.readouterr().out
    assert main(["search", str(folder / "0000_c1s1_000001_00.png"), "--gallery", "lobby", "--top-k", "2"]) == 0
    assert "0000_c1s1_000001_00.png" in capsys.readouterr().out
    assert main(["search", str(folder / "0000_c1s1_000001_00.png"), "--gallery", "lobby", "--top-k", "4",
                 "--refine", "kreciprocal", "--candidates", "2"]) == 1
    assert "HTTP 422 invalid_candidates" in capsys.readouterr().err
    assert main(["jobs", "--gallery", "lobby"]) == 0
    assert "no jobs" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: reid " + command in capsys.readouterr().out
