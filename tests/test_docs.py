"""Every command the README and docs/*.md show still composes: each `train` line of a fenced code
block (and each `evaluate`, `predict`, `generate` and `export-model` line, and `torchrun ... -m
trainer`) is turned into overrides and composed with Hydra's compose API, as `train --cfg job`
would compose it, without training. A sweep (`-m`, or an Optuna `hparams_search` preset) is
composed with the first value of each swept key. A folder given with `--config-dir` is the one
the page creates (`cat > DIR/... <<'EOF'` in a code block), written to a temporary folder."""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from trainer.cli import COMMANDS_DIR, CONFIG_DIR, _quoted_prompt
from trainer.run.sweep import check_sweeper_overrides

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The command's config: train.yaml in configs/, the others in configs/commands/.
CONFIGS = {"train": "train", "evaluate": "evaluate", "predict": "predict",
           "generate": "generate", "export-model": "export"}
HEREDOC = re.compile(r"cat > (\S+) <<-?'?(\w+)'?")
ENV_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Shown:
    page: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.text}"


def _fenced_lines(page: Path) -> list[tuple[int, str]]:
    """The lines of the page's fenced code blocks, a line ending in `\\` joined to the next."""
    lines, joined, inside, start = [], "", False, 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, joined = not inside, ""
            continue
        if not inside:
            continue
        start = start if joined else number
        if line.rstrip().endswith("\\"):
            joined += (line.lstrip() if joined else line).rstrip()[:-1].rstrip() + " "
            continue
        lines.append((start, joined + (line.lstrip() if joined else line)))
        joined = ""
    return lines


def _heredocs(page: Path) -> dict[str, str]:
    """The files a page's code blocks write with `cat > PATH <<'TAG'`: path -> text."""
    files, lines = {}, iter(_fenced_lines(page))
    for _, line in lines:
        if match := HEREDOC.search(line):
            body = []
            for _, inner in lines:
                if inner.strip() == match[2]:
                    break
                body.append(inner)
            files[match[1]] = "\n".join(body) + "\n"
    return files


def _argv(text: str) -> list[str] | None:
    """The command a line runs (env assignments and a `$ ` prompt dropped), or None if it runs
    none of this project's commands."""
    try:
        words = shlex.split(text.strip().removeprefix("$ "), comments=True)
    except ValueError:  # an unbalanced quote: prose or output, not a command
        return None
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words[:1] == ["torchrun"] and "trainer" in words:  # torchrun ... -m trainer ARGS
        at = words.index("trainer")
        if words[at - 1] == "-m":
            return ["train", *words[at + 1:]]
    if words and words[0] in CONFIGS:
        return words
    return None


def _shown_commands() -> list[Shown]:
    return [Shown(page, number, text.strip()) for page in PAGES
            for number, text in _fenced_lines(page) if _argv(text)]


SHOWN = _shown_commands()


def _as_the_command_takes_it(command: str, word: str) -> str:
    """An argument as the console script hands it to Hydra (trainer.cli's evaluate and generate):
    evaluate's `data.KEY=` changes a key of the run's data, so it goes in with a `+`; generate's
    prompt is quoted for Hydra's grammar."""
    if command == "evaluate" and word.startswith("data."):
        return "+" + word
    return _quoted_prompt(word) if command == "generate" else word


def _overrides(argv: list[str], config_root: Path) -> list[str]:
    """The command line as compose() takes it: flags taken as Hydra takes them, and each swept
    key (a comma list, `choice`, `range`, `interval`) given its first value where the command
    sweeps (`-m`, or an `hparams_search` preset, which sets Hydra's MULTIRUN mode)."""
    overrides, dirs, words = [], [], iter(argv[1:])
    multirun = False
    for word in words:
        if word in ("-m", "--multirun"):
            multirun = True
        elif word in ("--help", "-h"):
            pass
        elif word in ("--cfg", "-c"):
            assert next(words, None) in ("job", "hydra", "all"), "--cfg takes job, hydra or all"
        elif word in ("--config-dir", "-cd") or word.startswith("--config-dir="):
            folder = word.split("=", 1)[1] if "=" in word else next(words)
            assert (config_root / folder).is_dir(), f"--config-dir {folder}: no page creates it"
            dirs.append(f"file://{config_root / folder}")
        elif word.startswith("-"):
            pytest.fail(f"{word}: a flag this test does not know")
        else:
            overrides.append(_as_the_command_takes_it(argv[0], word))
    multirun |= any(o.startswith("hparams_search=") for o in overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    composed = []
    for text, override in zip(overrides, parsed, strict=True):
        if not override.is_sweep_override():
            composed.append(text)
            continue
        assert multirun, f"{text} sweeps: the command needs -m (Hydra refuses it otherwise)"
        sweep = override.value()
        first = (str(sweep.start) if isinstance(sweep, IntervalSweep)
                 else next(override.sweep_string_iterator()))
        composed.append(f"{override.get_key_element()}={first}")
    if dirs:
        composed.append(f"hydra.searchpath=[{','.join(dirs)}]")
    return composed


def test_the_pages_show_commands() -> None:
    """The collection itself works: the README and docs show dozens of train lines."""
    assert sum(Path(s.page).name == "README.md" for s in SHOWN) >= 10
    assert sum(_argv(s.text)[0] == "train" for s in SHOWN) >= 40


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """Each page's folder of the files its code blocks write (the user's own configs)."""
    folders = {}
    for page in PAGES:
        folders[page] = folder = tmp_path_factory.mktemp(page.stem)
        for path, text in _heredocs(page).items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(text)
    return folders


@functools.cache
def _compose(command: str, overrides: tuple[str, ...]) -> None:
    """Compose once per command line: the README and the docs show some lines twice, and each
    composition takes about 0.1 s."""
    check_sweeper_overrides(list(overrides))
    config_dir = CONFIG_DIR if command == "train" else COMMANDS_DIR
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        compose(CONFIGS[command], overrides=list(overrides))


@pytest.mark.parametrize("shown", SHOWN, ids=str)
def test_shown_command_composes(shown: Shown, written: dict[Path, Path]) -> None:
    argv = _argv(shown.text)
    _compose(argv[0], tuple(_overrides(argv, written[shown.page])))


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_between_pages_resolve(page: Path) -> None:
    """Every link to a page of this repository names a file that exists, and an anchor its
    headings make."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or anchor and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"
