"""One grammar for every `thalia-ray` command, checked on the parser itself: a command added later is
covered as soon as it exists.

- every command and every option has help text;
- every command that reports something takes `--json`, and then prints one JSON document on stdout and
  nothing else (the commands exempt, and why, are listed in NO_JSON);
- `--store` is documented and defaults to $THALIA_STORE, then ./runs; a run configuration's
  `storage.store` defaults to $THALIA_STORE too;
- `--version` prints the package's version.

The exit statuses of bad input are in test_cli_errors.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from thalia_ray import cli
from thalia_ray.config import StorageConfig, ThaliaConfig
from thalia_ray.store import ExperimentStore
from thalia_ray.store.layout import STORE_ENV

REPO = Path(__file__).resolve().parents[1]
# Commands that report nothing for a program to read, with the reason.
NO_JSON = {"demo": "a narrated walkthrough for people; what it makes is read back with runs, leaderboard and "
                   "report --json"}
BUILT_IN_STORE = StorageConfig.model_fields["store"].default


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
              ) -> Iterator[tuple[str, argparse.ArgumentParser, str | None]]:
    """(words, parser, help in its parent's list) of every command and command group, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield " ".join((*words, name)), sub, helps.get(name)
                yield from _commands(sub, (*words, name))


def _is_group(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


ALL = {words: (parser, help_text) for words, parser, help_text in _commands(cli.build_parser())}
LEAVES = {words: parser for words, (parser, _) in ALL.items() if not _is_group(parser)}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def _required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Values for `parser`'s required arguments: the first choice, else a placeholder (a number where the
    argument is one)."""
    argv: list[str] = []
    for action in parser._actions:
        if action.required:
            value = str(next(iter(action.choices))) if action.choices else "1" if action.type in (int, float) else "x"
            argv += [*action.option_strings[:1], value]
    return argv


def _parse(words: str, *extra: str) -> argparse.Namespace:
    parser = cli.build_parser()  # after any monkeypatched environment: defaults are read when it is built
    return parser.parse_args([*words.split(), *_required_argv(LEAVES[words]), *extra])


def test_the_walk_finds_every_command():
    assert {"config show", "train", "sweep", "leaderboard", "prepare index", "cluster validate", "bench"} <= set(LEAVES)
    assert not set(NO_JSON) - set(LEAVES), "an exemption for a command that no longer exists"


@pytest.mark.parametrize("words", sorted(ALL))
def test_every_command_and_option_has_help(words):
    parser, help_text = ALL[words]
    assert help_text and help_text.strip(), f"`thalia-ray {words}` has no help in its parent's command list"
    bare = [a.dest for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and (not a.help or not a.help.strip() or a.help == argparse.SUPPRESS)]
    assert not bare, f"`thalia-ray {words}`: arguments without help: {bare}"


@pytest.mark.parametrize("words", sorted(LEAVES))
def test_every_reporting_command_takes_json(words):
    if words in NO_JSON:
        assert "--json" not in _options(LEAVES[words]), f"{words} takes --json now: drop its exemption"
        return
    option = _options(LEAVES[words]).get("--json")
    assert option is not None, f"`thalia-ray {words}` reports something but has no --json"
    assert option.nargs == 0 and "JSON document on stdout" in option.help
    assert _parse(words, "--json").json is True  # what `main` goes by


STORE_COMMANDS = sorted(words for words, parser in LEAVES.items() if "--store" in _options(parser))


def test_the_store_taking_commands_are_found():
    assert {"runs", "leaderboard", "report", "evaluate", "predict", "export-model", "bench"} <= set(STORE_COMMANDS)


@pytest.mark.parametrize("words", STORE_COMMANDS)
def test_store_is_documented_and_defaults_to_the_environment(words, monkeypatch, tmp_path):
    option = _options(LEAVES[words])["--store"]
    assert option.help and STORE_ENV in option.help and "s3://" in option.help
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert _parse(words).store == BUILT_IN_STORE
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "from-env"))
    assert _parse(words).store == str(tmp_path / "from-env")
    assert _parse(words, "--store", "s3://given/prefix").store == "s3://given/prefix"


def _stored_run(store: ExperimentStore, run_id: str, value: float) -> None:
    """A finished run's records, as training leaves them (no predictions)."""
    record = store.run(run_id)
    record.write_config(ThaliaConfig.model_validate({"name": run_id, "train": {"lr": value / 100}}))
    record.set_status("running", task="classification", model="resnet18")
    record.write_history([{"epoch": 1, "val/loss": 1.0, "val/f1_deformation": value}])
    record.write_results({"val/f1_deformation": value, "test/f1_deformation": value - 0.1}, best_epoch=1,
                         best_checkpoint=None)
    record.set_status("finished")


def test_a_command_finds_the_store_in_the_environment(tmp_path, monkeypatch, capsys):
    _stored_run(ExperimentStore(str(tmp_path / "env-store")), "r-env", 0.5)
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "env-store"))
    assert cli.main(["runs", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["r-env"]
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.chdir(tmp_path)  # ./runs holds nothing here
    assert cli.main(["runs", "--json"]) == 7 and capsys.readouterr().out == ""


def test_a_configuration_takes_its_store_from_the_environment_unless_it_names_one(tmp_path, monkeypatch, capsys):
    def store_of(*argv: str) -> str:
        assert cli.main(["config", "show", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["storage"]["store"]

    monkeypatch.delenv(STORE_ENV, raising=False)
    assert store_of() == BUILT_IN_STORE
    monkeypatch.setenv(STORE_ENV, "s3://cluster/store")
    assert store_of() == "s3://cluster/store"
    (tmp_path / "named.yaml").write_text("storage: {store: /data/named}\n")
    assert store_of(str(tmp_path / "named.yaml")) == "/data/named"  # the file wins
    assert store_of(str(tmp_path / "named.yaml"), "--set", "storage.store=/data/set") == "/data/set"  # --set too


@pytest.fixture()
def store_with_runs(tmp_path) -> Path:
    store = ExperimentStore(str(tmp_path / "store"))
    _stored_run(store, "r-low", 0.4)
    _stored_run(store, "r-high", 0.7)
    return tmp_path / "store"


@pytest.mark.parametrize("argv", [
    ["config", "show"], ["models"], ["bench", "list"], ["runs"], ["runs", "show", "r-high"], ["leaderboard"],
    ["cluster", "validate", str(REPO / "cluster/aws-gpu.yaml")],
    ["submit", str(REPO / "jobs/train-cls-single.yaml"), "--print-ray-command"],
], ids=" ".join)
def test_json_is_one_document_and_all_of_stdout(argv, store_with_runs, monkeypatch, capsys):
    monkeypatch.setenv(STORE_ENV, str(store_with_runs))
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    document = json.loads(out)  # the whole of stdout: one document, nothing before or after it
    assert document and out.startswith(("{", "["))
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.strip() and text != out  # people get text, not the JSON


def test_json_documents_hold_what_the_text_shows(store_with_runs, monkeypatch, capsys):
    monkeypatch.setenv(STORE_ENV, str(store_with_runs))
    assert cli.main(["runs", "show", "r-high", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["run_id"], shown["status"], shown["results"]["metrics"]["val/f1_deformation"]) == (
        "r-high", "finished", 0.7)
    assert len(shown["history"]) == 1 and shown["whole_frame"] is None
    assert cli.main(["leaderboard", "--json"]) == 0
    by_json = json.loads(capsys.readouterr().out)
    assert cli.main(["leaderboard", "--format", "json"]) == 0  # --format json is the same table
    assert json.loads(capsys.readouterr().out) == by_json and {r["run_id"] for r in by_json} == {"r-low", "r-high"}


def test_json_keeps_stray_output_off_stdout(monkeypatch, capsys):
    """Whatever a command (or Ray, from its threads) prints while a --json command runs goes to stderr."""
    def noisy(args: argparse.Namespace) -> int:
        print("a warning someone printed")
        cli._emit_json(args, {"nan": float("nan"), "when": __import__("datetime").date(2024, 5, 1)})
        return 0

    monkeypatch.setattr(cli, "cmd_models", noisy)
    assert cli.main(["models", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"nan": None, "when": "2024-05-01"}  # strict JSON: NaN is null
    assert "a warning someone printed" in captured.err


def test_version_is_the_package_version():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run([sys.executable, "-m", "thalia_ray.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"thalia-ray {declared} (Ray ") and "Python" in proc.stdout
