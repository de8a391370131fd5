"""Every ```python block of README.md runs as written (issue 14), in order, in one namespace (later blocks use
what earlier ones defined: ``model``, ``train``, ``test``, ...), in a temporary working directory.

What the test changes, and nothing else (the *tiny settings*, so the module takes well under a minute on one
thread): the data are the first ``TRAIN`` / ``TEST`` images (``get_loaders`` gets ``limit_train`` /
``limit_test`` unless the snippet gives them), every training call runs at most ``EPOCHS`` epochs (``finetune``,
``gradual_prune`` with ``prune_epochs`` capped too, ``lottery_ticket`` with its rewind step capped to fit the
shorter rounds, ``distill`` at most ``STEPS`` steps), distillation calibrates on at most ``SENTENCES``
sentences, ``advise`` times ``REPEAT`` samples per candidate, and torch runs one thread. What the blocks register
(the README's own criterion) is unregistered afterwards.

A block that cannot run in this budget is skipped only where README.md says so, on the line right before its
fence::

    <!-- snippet: slow, <why, and which test runs it instead> -->

and the skipped blocks must be exactly ``KNOWN_SLOW``: a new heavy example has to be declared here too.
"""
from __future__ import annotations

import functools
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"^<!--\s*snippet:\s*(?P<kind>\w+)\s*,\s*(?P<why>.+?)\s*-->\s*$")

TRAIN, TEST = 1024, 500        # images
EPOCHS, PRUNE_EPOCHS = 1, 1
STEPS = 2                      # distillation steps
SENTENCES = 64                 # distillation sentences
REPEAT = 3                     # advise's timed samples per candidate and batch
REWIND = 2                     # lottery rewind step (the README's 200 is past a tiny round's end)

# (section heading, number of slow blocks in it): the README's blocks that only their own tests run
KNOWN_SLOW = {"Decoder LLMs: Llama, Qwen2, Mistral, GPT-2 (grouped-query attention included)": 2}


@dataclass
class Snippet:
    line: int                 # of the first code line in README.md
    section: str              # the heading above it
    code: str
    skip: Optional[str]       # the marker's reason, when marked slow

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')[:40]}"


def snippets(text: str) -> List[Snippet]:
    """The ```python blocks of a Markdown text, with the heading above each and its marker, if any."""
    out: List[Snippet] = []
    lines = text.splitlines()
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.strip().startswith("```") and line.strip() != "```":
            lang = line.strip()[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if lang == "python":
                prev = lines[i - 1].strip() if i else ""
                m = MARKER.match(prev)
                if prev.startswith("<!--") and (m is None or m["kind"] != "slow"):
                    raise AssertionError(f"README.md line {i}: malformed snippet marker {prev!r}")
                out.append(Snippet(i + 2, section, "\n".join(lines[i + 1:end]), m["why"] if m else None))
            i = end + 1
            continue
        i += 1
    return out


SNIPPETS = snippets(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_snippets_and_parses():
    assert len(SNIPPETS) >= 10
    for s in SNIPPETS:
        compile(s.code, f"README.md:{s.line}", "exec")   # a syntax error fails here, naming the line


def test_only_the_known_slow_snippets_are_skipped_and_each_says_why():
    skipped: Dict[str, int] = {}
    for s in SNIPPETS:
        if s.skip is not None:
            skipped[s.section] = skipped.get(s.section, 0) + 1
            assert "test" in s.skip, f"README.md:{s.line}: the marker must name the test that runs it: {s.skip!r}"
    assert skipped == KNOWN_SLOW


def test_the_parser_reads_markers_and_sections():
    text = ("# A\n```python\nx = 1\n```\n## B\n<!-- snippet: slow, minutes: run by tests/x.py -->\n"
            "```python\ny = 2\n```\n```bash\nls\n```\n")
    got = snippets(text)
    assert [(s.line, s.section, s.code, s.skip) for s in got] == [
        (3, "A", "x = 1", None), (8, "B", "y = 2", "minutes: run by tests/x.py")]
    with pytest.raises(AssertionError, match="malformed"):
        snippets("<!-- snippet: fast -->\n```python\nx = 1\n```\n")


# ----------------------------------------------------------------------------- running them


def _capped(fn, **caps):
    """``fn`` with the keyword arguments in ``caps`` limited to at most their cap (defaults filled in)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        for key, cap in caps.items():
            value = kwargs.get(key, cap)
            kwargs[key] = min(value, cap) if isinstance(value, (int, float)) and not isinstance(value, bool) \
                else value
        return fn(*args, **kwargs)
    return call


def _tiny(monkeypatch) -> None:
    """The tiny settings of the module docstring."""
    import importlib

    import prunekit
    import prunekit.advise
    import prunekit.train
    import prunekit.train.lottery
    import prunekit.zoo.data
    import prunekit.zoo.textdata

    distill_module = importlib.import_module("prunekit.train.distill")   # prunekit.train.distill: the function
    real_loaders = prunekit.zoo.data.get_loaders

    def get_loaders(*args, **kwargs):
        kwargs["limit_train"] = kwargs.get("limit_train") or TRAIN
        kwargs["limit_test"] = kwargs.get("limit_test") or TEST
        return real_loaders(*args, **kwargs)

    monkeypatch.setattr(prunekit.zoo.data, "get_loaders", get_loaders)
    finetune = _capped(prunekit.train.loop.finetune, epochs=EPOCHS)
    monkeypatch.setattr(prunekit, "finetune", finetune)
    monkeypatch.setattr(prunekit.train, "finetune", finetune)
    gradual = _capped(prunekit.train.gradual_prune, epochs=EPOCHS, prune_epochs=PRUNE_EPOCHS)
    monkeypatch.setattr(prunekit.train, "gradual_prune", gradual)
    lottery = _capped(prunekit.train.lottery.lottery_ticket, epochs_per_round=EPOCHS, rewind=REWIND)
    monkeypatch.setattr(prunekit.train.lottery, "lottery_ticket", lottery)
    monkeypatch.setattr(prunekit.train, "lottery_ticket", lottery)
    distill = _capped(distill_module.distill, max_steps=STEPS, epochs=EPOCHS)
    monkeypatch.setattr(distill_module, "distill", distill)
    monkeypatch.setattr(prunekit.train, "distill", distill)
    sentences = prunekit.zoo.textdata.calibration_sentences
    monkeypatch.setattr(prunekit.zoo.textdata, "calibration_sentences",
                        lambda n=256, seed=0: sentences(min(n, SENTENCES), seed))
    monkeypatch.setattr(prunekit.advise, "advise", _capped(prunekit.advise.advise, repeat=REPEAT))


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """One namespace for every block, in a temporary working directory, on the tiny settings."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("readme"))
        mp.setenv("PRUNEKIT_PROGRESS", "0")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _tiny(mp)
        from prunekit.criteria import CRITERIA

        mp.setattr(CRITERIA, "_items", dict(CRITERIA._items))   # the README registers "my_score": not for later tests
        try:
            yield {"globals": {"__name__": "__readme__"}, "failed": None}
        finally:
            torch.set_num_threads(threads)


def _run(snippet: Snippet, ns: Dict[str, Any]) -> None:
    # padded so that a traceback names the README's own line numbers
    code = compile("\n" * (snippet.line - 1) + snippet.code, str(README), "exec")
    exec(code, ns)  # the README's own examples: the point of this test


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs_as_written(namespace, snippet):
    if snippet.skip is not None:
        pytest.skip(f"marked slow in README.md: {snippet.skip}")
    if namespace["failed"] is not None:
        pytest.fail(f"not run: the snippet at README.md line {namespace['failed']} failed, and later ones may "
                    "use what it defines", pytrace=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    error = None
    try:
        _run(snippet, namespace["globals"])
    except Exception as e:
        namespace["failed"] = snippet.line
        where = [f"  README.md line {f.lineno}: {f.line}" for f in traceback.extract_tb(e.__traceback__)
                 if f.filename == str(README)]
        error = "\n".join(where + traceback.format_exception_only(e))
    finally:
        torch.random.set_rng_state(state)
    if error is not None:
        pytest.fail(f"README.md line {snippet.line} ({snippet.section}) failed as written:\n{error}", pytrace=False)
