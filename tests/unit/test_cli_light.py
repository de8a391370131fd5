"""The command line answers ``--help`` and argparse errors without importing torch, lists the registries' names
from a static copy that equals them, shows every default, takes ``-v`` after the command, and applies
``--threads`` in one place (issue 14).

The torch-free checks run in a fresh interpreter (this one has torch loaded); the rest run
``prunekit.cli.__main__.main`` here with the command's ``run`` replaced, so nothing trains.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import prunekit.cli.prune as cli_prune
from prunekit.cli import _common, _names
from prunekit.cli.__main__ import COMMANDS, build_parser, main
from prunekit.errors import PrunekitError

# the commands that compute (train, prune, time): each takes --threads
COMPUTING = ("demo", "prune", "eval", "export", "sensitivity", "advise", "lottery")
# the smallest valid command line of each (positional arguments, required flags)
MINIMAL = {"eval": ["eval", "some/model"], "export": ["export", "some/model", "--out", "m.onnx"],
           "report": ["report", "some/run"]}

# argv lists that must answer without importing torch: every help, and argparse's errors
LIGHT_ARGVS = [["--help"], *([cmd, "--help"] for cmd in COMMANDS), ["prune", "--sparsity", "abc"],
               ["nope"], [], ["prune", "--bogus"], ["advise", "--target", "nope"], ["export", "--json"],
               ["-v", "prune", "--threads", "x"]]

LIGHT_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    import prunekit.cli.__main__ as m

    report = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = m.main(argv)
            except SystemExit as e:
                code = e.code
        heavy = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "numpy"))
        report.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                       "heavy": heavy[:5]})
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def light_runs():
    """Every LIGHT_ARGVS line through main() in one fresh interpreter, what it imported noted after each."""
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-c", LIGHT_SCRIPT, json.dumps(LIGHT_ARGVS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {" ".join(r["argv"]): r for r in json.loads(proc.stdout)}


@pytest.mark.parametrize("argv", [" ".join(a) for a in LIGHT_ARGVS])
def test_help_and_argument_errors_do_not_import_torch(light_runs, argv):
    r = light_runs[argv]
    assert r["heavy"] == [], f"`prunekit {argv}` imported {r['heavy']}"
    if "--help" in argv:
        assert r["code"] == 0 and "usage: prunekit" in r["out"]
    else:
        assert r["code"] == 2 and "error:" in r["err"] and "Traceback" not in r["err"]


def test_torch_free_help_lists_every_registered_name(light_runs):
    """What the static copy gives (no registry imported) is what the registries hold."""
    prune_help, sens_help = light_runs["prune --help"]["out"], light_runs["sensitivity --help"]["out"]
    for kind in ("model", "dataset", "criterion", "pruner", "kind", "scope", "pattern", "optimizer",
                 "lr_schedule", "allocation"):
        for name in _names.live(kind):
            assert name in prune_help, (kind, name)
    for name in _names.live("criterion") + _names.live("sensitivity_pattern") + _names.live("sensitivity_weights"):
        assert name in sens_help, name
    for name in _names.live("advise_target") + _names.live("advise_kind"):
        assert name in light_runs["advise --help"]["out"], name
    for name in _names.live("exporter"):
        assert name in light_runs["export --help"]["out"], name


def test_static_names_equal_the_registries():
    """The CLI's static copy of every registry (for torch-free help) equals the registry, read in a fresh
    interpreter so that no plugin registered by another test counts: a new name must be added to _names.STATIC."""
    script = "import json; from prunekit.cli._names import STATIC, live; print(json.dumps({k: live(k) for k in STATIC}))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    registries = json.loads(proc.stdout)
    for kind, (module, attr, static) in _names.STATIC.items():
        assert list(static) == registries[kind], (f"prunekit.cli._names.STATIC[{kind!r}] differs from "
                                                  f"{module}.{attr}: {registries[kind]}")


def test_names_read_the_live_registry_once_it_is_imported(monkeypatch):
    from prunekit.criteria import CRITERIA, Criterion

    monkeypatch.setitem(CRITERIA._items, "zz_plugin", Criterion("zz_plugin", lambda p, ctx: p.abs()))
    assert "zz_plugin" in _names.names("criterion") and "zz_plugin" in _names.criterion_names()
    assert "zz_plugin" not in _names.STATIC["criterion"][2]


# ----------------------------------------------------------------------------- defaults in the help


def _options(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    return p, [a for a in p._actions if a.option_strings and a.help is not argparse.SUPPRESS]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_every_default(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    p, actions = _options(command)
    formatter = p._get_formatter()
    for a in actions:
        d = a.default
        if command == "prune" and a.dest.replace("_", "-") in cli_prune.FLAGS:
            d = cli_prune.recipe_default(a.dest.replace("_", "-"))   # None on the flag: the recipe's default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS:
            continue
        text = formatter._expand_help(a)
        assert "default" in text, f"`prunekit {command} {a.option_strings[-1]}` does not say its default {d!r}"


def test_prune_help_names_recipe_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("(default: 0.9)", "(default: 40)", "(default: 0.01)", "(default: runs/prune)", "(default: 2:4)",
                   "lenet300 (default)", "l1 (default)"):
        assert needle in out, needle


# ----------------------------------------------------------------------------- -v after the command


@pytest.mark.parametrize("argv", [["-v", "prune", "--criterion", "nope"], ["prune", "-v", "--criterion", "nope"],
                                  ["prune", "--criterion", "nope", "--verbose"]])
def test_verbose_before_or_after_the_command(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrunekitError, match="unknown criterion 'nope'"):  # -v: the traceback, not one line
        main([*argv, "--out", "run"])


def test_without_verbose_a_users_error_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--criterion", "nope", "--out", "run"]) == 2
    assert capsys.readouterr().err.startswith("prunekit prune: error: unknown criterion 'nope'")


# ----------------------------------------------------------------------------- --threads


def _argv(command, *extra):
    return [*MINIMAL.get(command, [command]), *extra]


@pytest.mark.parametrize("command", COMPUTING)
def test_every_computing_command_takes_threads(command):
    assert build_parser().parse_args(_argv(command, "--threads", "3")).threads == 3
    assert build_parser().parse_args(_argv(command)).threads is None   # resolved by main: see below


@pytest.fixture
def seen(monkeypatch):
    """Replace every command's run() by one that records args.threads and torch's threads while it runs."""
    calls = []

    def fake_run(args):
        calls.append((args.command, args.threads, torch.get_num_threads()))
        return 0

    for command in COMMANDS:
        monkeypatch.setattr(importlib.import_module(f"prunekit.cli.{COMMANDS[command]}"), "run", fake_run)
    before = torch.get_num_threads()
    yield calls
    assert torch.get_num_threads() == before   # main() restores the count it found


@pytest.mark.parametrize("command", COMPUTING)
def test_threads_are_applied_before_the_command_runs(seen, monkeypatch, command):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for extra in ([], ["--threads", "2"], ["--threads", "0"]):   # default: 1; 0: torch's own, as it was
            assert main(_argv(command, *extra)) == 0
            assert torch.get_num_threads() == 2   # restored afterwards
    finally:
        torch.set_num_threads(old)
    assert seen == [(command, 1, 1), (command, 2, 2), (command, 2, 2)]


def test_threads_default_to_torchs_when_omp_num_threads_is_set(seen, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    assert main(["prune"]) == 0
    assert seen == [("prune", before, before)]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert main(["prune"]) == 0 and seen[-1] == ("prune", 1, 1)


def test_negative_threads_is_a_users_error(seen, capsys):
    assert main(["prune", "--threads", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "prunekit prune: error: --threads -1 must be >= 0 (0: torch's default)"
    assert seen == []


def test_commands_that_do_not_compute_take_no_threads():
    for command in ("report", "env"):
        assert not hasattr(build_parser().parse_args(_argv(command)), "threads")


# ----------------------------------------------------------------------------- --no-progress


def test_no_progress_turns_every_bar_off_while_the_command_runs(monkeypatch):
    monkeypatch.delenv("PRUNEKIT_PROGRESS", raising=False)
    with _common.no_progress(True):
        assert os.environ["PRUNEKIT_PROGRESS"] == "0"
    assert "PRUNEKIT_PROGRESS" not in os.environ
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "1")
    with _common.no_progress(True):
        assert os.environ["PRUNEKIT_PROGRESS"] == "0"
    assert os.environ["PRUNEKIT_PROGRESS"] == "1"
    with _common.no_progress(False):
        assert os.environ["PRUNEKIT_PROGRESS"] == "1"


def test_the_front_door_imports_on_first_use():
    """``import prunekit`` (run by every ``prunekit`` command line) is light; each name of ``__all__`` still
    resolves, to the object its defining module has."""
    import prunekit
    from prunekit.api import prune
    from prunekit.apply.masking import apply

    assert all(getattr(prunekit, name) is not None for name in prunekit.__all__)
    assert prunekit.prune is prune and prunekit.apply_plan is apply
    script = "import sys, prunekit; assert 'torch' not in sys.modules; prunekit.Plan; assert 'torch' in sys.modules"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
