"""The CLI's help and choices follow the registries, and its error handling tells a user's mistake from a bug.

Everything here runs ``prunekit.cli.__main__.main`` in this process and stops before any data is loaded or
model trained (one subprocess checks what a user sees on a bug), so the module takes seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

import prunekit.cli._common as common
import prunekit.cli.prune as cli_prune
from prunekit.advise import KINDS as ADVISE_KINDS, TARGETS
from prunekit.analysis.sensitivity import PATTERNS as SENSITIVITY_PATTERNS
from prunekit.cli.__main__ import is_user_error, main
from prunekit.criteria import CRITERIA, Criterion
from prunekit.deploy.export import EXPORTERS
from prunekit.errors import PrunekitError, UnknownNameError
from prunekit.experiment import KINDS
from prunekit.pruners import PRUNERS
from prunekit.registry import Registry
from prunekit.select.allocation import ALLOCATIONS
from prunekit.select.ranking import PATTERNS
from prunekit.spec import SCOPES
from prunekit.train.config import LR_SCHEDULES, OPTIMIZERS
from prunekit.zoo.data import DATASETS
from prunekit.zoo.models import MODELS


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal width: keep each help on few lines


def option_help(capsys, command, flag) -> str:
    """The help of ``flag`` as ``prunekit <command> --help`` prints it, whitespace collapsed."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith(f"  {flag} ") or ln == f"  {flag}"]
    assert len(starts) == 1, f"{flag} not in `prunekit {command} --help`:\n" + "\n".join(lines)
    block = [lines[starts[0]]]
    for ln in lines[starts[0] + 1:]:
        if not ln.startswith("    "):  # an option line is indented by 2, its wrapped help by more
            break
        block.append(ln)
    return " ".join(" ".join(block).split())


# (command, flag) -> the names its help must list, read from the registry or tuple that defines them
REGISTRY_OPTIONS = {
    **{(cmd, "--model"): MODELS.names for cmd in ("prune", "sensitivity", "advise", "lottery", "demo")},
    **{(cmd, "--data"): lambda: DATASETS for cmd in ("prune", "sensitivity", "advise", "lottery", "demo", "eval",
                                                       "export")},
    ("prune", "--criterion"): lambda: CRITERIA.names() + PRUNERS.names(),
    ("sensitivity", "--criterion"): CRITERIA.names,
    ("prune", "--scope"): lambda: SCOPES,
    ("prune", "--pattern"): lambda: PATTERNS,
    ("sensitivity", "--pattern"): lambda: SENSITIVITY_PATTERNS,
    ("prune", "--schedule"): lambda: KINDS,
    ("prune", "--optimizer"): lambda: OPTIMIZERS,
    ("prune", "--lr-schedule"): lambda: LR_SCHEDULES,
    ("prune", "--allocation"): lambda: ALLOCATIONS,
    ("advise", "--target"): lambda: TARGETS,
    ("advise", "--candidates"): lambda: ADVISE_KINDS,
    ("export", "--exporter"): lambda: EXPORTERS,
}


@pytest.mark.parametrize("command, flag, name", [
    pytest.param(cmd, flag, name, id=f"{cmd}{flag}={name}")
    for (cmd, flag), names in REGISTRY_OPTIONS.items() for name in names()])
def test_help_lists_every_registered_name(capsys, command, flag, name):
    assert name in option_help(capsys, command, flag)


def test_every_registry_has_names():
    """The parametrisation above is only as good as these lists: none may be empty."""
    for (command, flag), names in REGISTRY_OPTIONS.items():
        assert len(names()) >= 2, (command, flag)
    assert "sparsegpt" in PRUNERS and "row" in SCOPES and "surgery" in KINDS


def test_help_is_read_from_the_registries_when_the_parser_is_built(capsys, monkeypatch):
    monkeypatch.setitem(CRITERIA._items, "zz_plugin_score", Criterion("zz_plugin_score", lambda p, ctx: p.abs()))
    monkeypatch.setitem(MODELS._items, "zz_plugin_net", object)
    assert "zz_plugin_score" in option_help(capsys, "prune", "--criterion")
    assert "zz_plugin_score" in option_help(capsys, "sensitivity", "--criterion")
    for command in ("prune", "demo", "lottery"):
        assert "zz_plugin_net" in option_help(capsys, command, "--model")


def test_hard_coded_choices_are_gone():
    """What the issue found: the old help texts listed a fixed subset of the names."""
    texts = [help_ for _, _, help_ in cli_prune.FLAGS.values()]
    assert not any("l1, random" in t or "layer or global" in t or "lenet5, vgg_small, mlp" in t for t in texts)


# ----------------------------------------------------------------------------- one line for a user's mistake


def _one_line(capsys, command) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"prunekit {command}: error:") and "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("command, allowed", [
    ("prune", lambda: CRITERIA.names() + PRUNERS.names()),
    ("sensitivity", CRITERIA.names),   # per-layer trials: scoring criteria only
])
def test_unknown_criterion_exits_2_with_one_line_naming_the_allowed_ones(tmp_path, monkeypatch, capsys, command,
                                                                        allowed):
    monkeypatch.chdir(tmp_path)
    assert main([command, "--criterion", "nope", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    line = _one_line(capsys, command)
    assert "unknown criterion 'nope'" in line
    for name in allowed():
        assert name in line, (name, line)
    if command == "sensitivity":
        assert "sparsegpt" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, what, allowed", [
    (["prune", "--model", "nope"], "model", MODELS.names),
    (["prune", "--scope", "nope"], "scope", lambda: SCOPES),
    (["prune", "--pattern", "nope"], "pattern", lambda: PATTERNS),
    (["prune", "--schedule", "nope"], "schedule", lambda: KINDS),
    (["prune", "--optimizer", "nope"], "finetune.optimizer", lambda: OPTIMIZERS),
    (["prune", "--lr-schedule", "nope"], "finetune.lr_schedule", lambda: LR_SCHEDULES),
    (["prune", "--data", "nope"], "dataset", lambda: DATASETS),
    (["advise", "--model", "nope"], "model", MODELS.names),
    (["lottery", "--model", "nope"], "model", MODELS.names),
    (["lottery", "--data", "nope"], "dataset", lambda: DATASETS),
    (["demo", "--model", "nope"], "model", MODELS.names),
    (["eval", "some/model", "--data", "nope"], "dataset", lambda: DATASETS),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_unknown_names_fail_before_any_work_naming_the_allowed_ones(tmp_path, monkeypatch, capsys, argv, what,
                                                                   allowed):
    monkeypatch.chdir(tmp_path)
    out = [] if argv[0] == "eval" else ["--out", str(tmp_path / "run")]
    assert main([*argv, *out]) == 2
    line = _one_line(capsys, argv[0])
    assert f"unknown {what}" in line and "'nope'" in line
    for name in allowed():
        assert name in line, (name, line)
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.iterdir())  # nothing written, nothing downloaded


@pytest.mark.parametrize("recipe, needle", [
    ({"method": None}, "'method' must be a mapping of name, kind"),
    ({"seed": {"x": 1}}, "'seed' must be a value, not a mapping"),
    ({"method": {"criterion": ["l1"]}}, "unknown criterion ['l1']"),
])
def test_malformed_recipe_is_a_user_error(tmp_path, monkeypatch, capsys, recipe, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["prune", "--recipe", "r.yaml", "--out", "run", "--no-progress"]) == 2
    assert needle in _one_line(capsys, "prune")


def test_set_through_a_value_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--set", "seed.x=1", "--out", "run"]) == 2
    assert "'seed' must be a value" in _one_line(capsys, "prune")


# ----------------------------------------------------------------------------- a bug keeps its traceback


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("a bug"), TypeError("a bug"),
                                   ValueError("a bug")], ids=lambda e: type(e).__name__)
def test_a_bug_in_a_command_propagates(tmp_path, monkeypatch, capsys, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_prune, "to_method", broken)
    with pytest.raises(type(error), match="a bug"):
        main(["prune", "--out", "run", "--no-progress"])
    assert "error:" not in capsys.readouterr().err


def test_a_bug_in_the_library_propagates(monkeypatch, capsys):
    import prunekit.experiment

    def broken():
        return {}["python"]   # a real KeyError from a real bug

    monkeypatch.setattr(prunekit.experiment, "env_info", broken)
    with pytest.raises(KeyError):
        main(["env"])
    assert capsys.readouterr().err == ""


def test_a_bug_shows_its_traceback_on_the_command_line(tmp_path):
    script = textwrap.dedent("""
        import sys
        import prunekit.experiment
        from prunekit.cli.__main__ import main

        def broken():
            raise KeyError("python")
        prunekit.experiment.env_info = broken
        sys.exit(main(["env"]))
    """)
    env = {**os.environ, "PRUNEKIT_CACHE_DIR": str(tmp_path / "cache"), "PRUNEKIT_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'python'" in proc.stderr
    assert "prunekit env: error" not in proc.stderr


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrunekitError, match="unknown criterion 'nope'"):
        main(["-v", "prune", "--criterion", "nope", "--out", "run"])


def _raised(fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # the test inspects whatever was raised
        return e
    raise AssertionError(f"{fn.__name__} raised nothing")


def _raise(error: BaseException):
    raise error


def test_what_counts_as_a_users_mistake():
    assert is_user_error(PrunekitError("x")) and is_user_error(FileNotFoundError("x"))
    unknown = _raised(Registry("thing").get, "nope")
    assert isinstance(unknown, UnknownNameError) and is_user_error(unknown)
    for bug in (ValueError("x"), KeyError("x"), TypeError("x"), RuntimeError("x")):
        assert not is_user_error(bug)                            # never raised: no site, a bug
        assert not is_user_error(_raised(_raise, bug))         # raised anywhere: a bug
    assert not is_user_error(_raised(int, "x"))                  # a ValueError from deep inside Python


def test_library_checks_of_user_input_raise_prunekit_errors():
    """The library's own input checks raise PrunekitError, so the CLI prints them as one line."""
    from prunekit.select.amount import resolve_amount
    from prunekit.train.lottery import imp_schedule

    for err in (_raised(imp_schedule, 0, final_sparsity=0.5), _raised(resolve_amount, 1.5, 10)):
        assert isinstance(err, PrunekitError) and is_user_error(err)


# ----------------------------------------------------------------------------- the registry's errors


def test_registry_errors_are_prunekit_errors():
    reg = Registry("gadget")
    reg.register("a")(object)
    err = _raised(reg.get, "b")
    assert isinstance(err, UnknownNameError) and isinstance(err, KeyError) and isinstance(err, PrunekitError)
    assert str(err) == "unknown gadget 'b'; known: a"
    assert isinstance(_raised(reg.get, ["a"]), UnknownNameError)   # unhashable: unknown too, not a TypeError
    dup = _raised(reg.register("a"), object)
    assert isinstance(dup, PrunekitError) and "already registered" in str(dup)
    reg.register("a", overwrite=True)(int)
    assert reg.get("a") is int


# ----------------------------------------------------------------------------- atomic writers


def test_run_files_are_written_atomically(tmp_path, monkeypatch):
    calls = []
    real = common.atomic_write_text
    monkeypatch.setattr(common, "atomic_write_text", lambda path, text: (calls.append(path), real(path, text)))
    common.write_yaml(tmp_path / "config.yaml", {"a": 1, "b": [0.5]})
    common.write_json(tmp_path / "results.json", {"x": float("nan"), "y": 2})
    assert calls == [tmp_path / "config.yaml", tmp_path / "results.json"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"a": 1, "b": [0.5]}
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": None, "y": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "results.json"]  # no temp files left
