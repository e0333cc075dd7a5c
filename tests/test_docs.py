"""The documentation is checked like code: every relative link in README.md and docs/ resolves (to
a file, and for `#anchor` links to one of its headings, by GitHub's slug rules); every
`python -m mim_jax.<module> ...` command in their code blocks parses its flags, `--config=FILE:ARGS`
included (which builds the config, so a wrong config argument fails here); and every
`docs/....md §N` that the code cites names a page and a section that exist; every table's header,
delimiter and rows have one number of cells (GitHub shows a table whose delimiter row differs from
its header as plain text).

Commands are parsed in-process, each on a fresh absl FlagValues that the entry point's own
`define_flags` fills, so nothing runs and the whole file takes seconds."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import pathlib
import re
import shlex
import sys

import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Entry points shown in the docs -> how many positional arguments their main() takes. mim_jax.plot
# reads sys.argv itself (one workdir) and defines no flags.
ENTRY_POINTS = {"mim_jax.main": 0, "mim_jax.bench": 0, "mim_jax.export": 0, "mim_jax.visualize": 1,
                "mim_jax.data.fashion_mnist": 0, "mim_jax.data.fashion_mnist_mosaic": 0, "mim_jax.data.prepare_folder": 0,
                "mim_jax.plot": 1, "mim_jax.aot": 0}
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")


# ---- Markdown -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    page: pathlib.Path
    line: int          # 1-based line of the block's first content line
    language: str
    lines: list[str]


def split_page(page: pathlib.Path) -> tuple[list[tuple[int, str]], list[Block]]:
    """(prose lines with their numbers, fenced code blocks)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"\s*(```|~~~)\s*([\w+-]*)", line)
        if block is None and fence:
            block = Block(page, number + 1, fence.group(2).lower(), [])
        elif block is not None and fence and not fence.group(2):
            blocks.append(block)
            block = None
        elif block is not None:
            block.lines.append(line)
        else:
            prose.append((number, line))
    assert block is None, f"{page}: unclosed code block from line {block.line - 1}"
    return prose, blocks


def heading_texts(page: pathlib.Path) -> list[str]:
    prose, _ = split_page(page)
    return [m.group(1) for _, line in prose if (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (link text, no backticks or emphasis stars),
    lower case, without punctuation except '-' and '_', spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    """Every heading's slug; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in heading_texts(page):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: pathlib.Path):
    """(line, target) of every Markdown link and image outside code (inline code spans too)."""
    prose, _ = split_page(page)
    for number, line in prose:
        text = re.sub(r"`[^`]*`", "", line)
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
            yield number, m.group(1)
        if m := re.match(r"\s*\[[^\]]+\]:\s*(\S+)", text):      # reference-style definitions
            yield number, m.group(1)


def relative_links():
    for page in PAGES:
        for number, target in links(page):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:, ...
                yield pytest.param(page, target, id=f"{page.relative_to(ROOT)}:{number}:{target}")


# ---- shell commands -------------------------------------------------------------------------------

def logical_lines(block: Block):
    """(line number, text) with backslash continuations joined."""
    pending, start = "", None
    for offset, line in enumerate(block.lines):
        if start is None:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending, start = "", None
    if pending:
        yield start, pending


def expand(text: str, name: str, value: str) -> str:
    return re.sub(r"\$(?:\{%s\}|%s\b)" % (name, name), value, text)


def shell_lines(block: Block):
    """(line number, command line) with `for x in a b c; do ... done` loops unrolled: one copy of
    the body per value, `$x` and `${x}` replaced. Other variables stay as they are (values)."""
    lines = list(logical_lines(block))
    i = 0
    while i < len(lines):
        number, text = lines[i]
        one_line = re.match(r"\s*for (\w+) in ([^;]*); do (.*); done\s*$", text)
        header = re.match(r"\s*for (\w+) in ([^;]*); do\s*$", text)
        if one_line:
            name, values, body = one_line.groups()
            for value in shlex.split(values):
                yield number, expand(body, name, value)
        elif header:
            name, values = header.groups()
            end = next(j for j in range(i + 1, len(lines)) if lines[j][1].strip() == "done")
            for value in shlex.split(values):
                for body_number, body in lines[i + 1:end]:
                    yield body_number, expand(body, name, value)
            i = end
        else:
            yield number, text
        i += 1


def commands_of(text: str):
    """The `python -m mim_jax.X args` commands of one shell line (split at ;, && and |), as
    (module, args) with the shell's quoting removed."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    for token in [*lexer, ";"]:
        if set(token) <= set(";&|"):
            words = segment
            while words and re.match(r"\w+=", words[0]):        # VAR=value prefixes
                words = words[1:]
            if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m" \
                    and words[2].startswith("mim_jax."):
                yield words[2], words[3:]
            segment = []
        else:
            segment.append(token)


def documented_commands():
    for page in PAGES:
        for block in split_page(page)[1]:
            if block.language not in SHELL_LANGUAGES:
                continue
            for number, text in shell_lines(block):
                for module, args in commands_of(text):
                    shown = " ".join(shlex.quote(a) for a in ["python", "-m", module, *args])
                    yield pytest.param(module, args, id=f"{page.relative_to(ROOT)}:{number}: {shown}")


def parse_command(module: str, args: list[str], monkeypatch) -> list[str]:
    """absl's parse of the command line on a fresh FlagValues; returns the positional arguments."""
    if module not in ENTRY_POINTS:
        raise AssertionError(f"{module} is not an entry point (known: {', '.join(ENTRY_POINTS)})")
    argv = [module, *args]
    if module == "mim_jax.plot":
        assert not [a for a in args if a.startswith("-")], "mim_jax.plot takes a workdir and no flags"
        return args
    fv = flags.FlagValues()
    importlib.import_module(module).define_flags(fv)
    # absl's logging flags (--verbosity, ...), which every absl program accepts; copies, so a
    # parse here never changes this process's own flags.
    for flag in flags.FLAGS.get_key_flags_for_module("absl.logging"):
        fv[flag.name] = copy.deepcopy(flag)
    # config_flags reads the --config.* overrides from sys.argv, as in a real run.
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    positional = fv(argv)[1:]
    # config_flags defers an OSError raised while it loads the config file (a file that is not
    # there) to the config's first use, which in a real run is main()'s: use it here. Configs read
    # no other file (a run, a weight file or a teacher is read when the run starts).
    if "config" in fv and fv["config"].value is not None:
        fv["config"].value.keys()
    return positional


# ---- tests ----------------------------------------------------------------------------------------

def test_slugs_follow_githubs_rules():
    assert slug("1. Model") == "1-model"
    assert slug("1.2 Predictor") == "12-predictor"
    assert slug("Released weights: import and `export`") == "released-weights-import-and-export"
    assert slug("CAE v2 (`cae_v2.py`)") == "cae-v2-cae_v2py"


def test_the_docs_show_commands():
    modules = {p.values[0] for p in documented_commands()}
    assert {"mim_jax.main", "mim_jax.bench", "mim_jax.export", "mim_jax.visualize"} <= modules


@pytest.mark.parametrize("page,target", relative_links())
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{target}: no {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved}"
    assert ROOT in resolved.parents or resolved == ROOT, f"{target} points outside the repository"
    if anchor:
        assert resolved.suffix == ".md", f"{target}: an anchor into a file that is not Markdown"
        assert anchor in anchors(resolved), f"{target}: no heading with that anchor in {resolved.name}"


def tables():
    """(page, first line, rows) of each Markdown table outside code blocks."""
    found = []
    for page in PAGES:
        prose, _ = split_page(page)
        current = []
        for number, line in prose + [(0, "")]:
            if line.lstrip().startswith("|"):
                current.append((number, line))
            elif current:
                found.append(pytest.param(page, current, id=f"{page.name}:{current[0][0]}"))
                current = []
    return found


def cells(row: str) -> int:
    """Cells of one table row: pipes that are neither escaped nor inside `code`."""
    row = re.sub(r"`[^`]*`", "", row.strip()).replace("\\|", "")
    return len(row.strip("|").split("|"))


@pytest.mark.parametrize("page,rows", tables())
def test_table_rows_match_the_header(page, rows):
    (first, header), (_, delimiter), *body = rows
    assert re.fullmatch(r"\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?", delimiter.strip()), (
        f"{page.name}:{first}: the line after a table's header is not a delimiter row")
    width = cells(header)
    for number, row in [(first + 1, delimiter), *body]:
        assert cells(row) == width, f"{page.name}:{number}: {cells(row)} cells, the header has {width}"


@pytest.mark.parametrize("module,args", documented_commands())
def test_documented_command_parses(module, args, monkeypatch):
    positional = parse_command(module, args, monkeypatch)
    assert len(positional) == ENTRY_POINTS[module], (
        f"{module} takes {ENTRY_POINTS[module]} positional argument(s), the command gives {positional}")


CITATION = re.compile(r"(docs/[\w./-]+\.md)((?:[\s,;]*(?:and\s+)?§\d+(?:\.\d+)*(?:-\d+(?:\.\d+)*)?)*)")


def section_numbers(page: pathlib.Path) -> set[str]:
    """'1', '1.2', ... of headings such as '## 1. Model' and '### 1.2 Predictor'."""
    return {m.group(1) for h in heading_texts(page) if (m := re.match(r"(\d+(?:\.\d+)*)\.?\s", h))}


def cited_sources():
    for path in sorted([*(ROOT / "mim_jax").rglob("*.py"), *(ROOT / "configs").glob("*.py"),
                        *(ROOT / "tests").glob("*.py")]):
        if path.name != "test_docs.py":
            yield pytest.param(path, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize("source", cited_sources())
def test_code_cites_pages_and_sections_that_exist(source):
    text = source.read_text()
    # A page name without its folder (e.g. 'capi.md §1.2') is not a path a reader can open.
    bare = [m.group(0) for m in re.finditer(r"(?<![/\w])[\w-]+\.md\b", text) if not (ROOT / m.group(0)).exists()]
    assert not bare, f"cites {bare}: write the path from the repository root (docs/methods/...)"
    for m in CITATION.finditer(text):
        page = ROOT / m.group(1)
        assert page.exists(), f"cites {m.group(1)}, which does not exist"
        numbers = section_numbers(page)
        for cited in re.findall(r"§([\d.]+(?:-[\d.]+)?)", m.group(2)):
            for number in cited.split("-"):
                assert number in numbers, f"cites {m.group(1)} §{number}, which has no such section"
