"""The documentation agrees with the code.

* every option a page names exists in ``hpuopt.Config`` — in an option table, an
  ``options={...}`` dict, a keyword of a call that takes options (``hpuopt.compile``,
  ``wrap_in_hpu_graph``, ``ModuleCacher``, ``wrap_submodules``, ``Config``...), or an
  ``HPUOPT_<NAME>`` variable;
* every ``Config`` field has a row in the user guide's option table, with its variable and its
  real default;
* every pass of ``hpuopt.pipeline.registry()`` has a page under ``docs/passes/``, no page exists
  for a pass that is not in the registry, and each page names its class, stage and how to
  disable it;
* every ``python`` code block in these pages is valid Python;
* every pass name a page gives to ``disable_passes`` is a real pass;
* every command a page shows is real: ``python <script> --flag ...`` names a script that exists
  and flags its argparse parser defines, ``make <target> VAR=...`` a Makefile target and
  variable, and a ``--flag`` mentioned on its own exists in the scripts its paragraph (or
  section heading) names — every script of a directory it names, like ``examples/`` — or, when it
  names none, in some script of the repository;
* every counter a page names (the counter table, ``counters.<name>``,
  ``counters.expect(<name>=...)``) is a field of ``hpuopt.counters``, and the user guide's counter
  table lists every field;
* every ``python`` block followed directly by a ``text`` block runs (as ``model.py`` in a fresh
  directory) and prints every line of that block (numbers may differ; ``...`` matches anything);
* every link to a section (``page.md#anchor``) finds that heading, and every troubleshooting
  section ``explain()`` links to exists.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from hpuopt.config import ENV_PREFIX, Config
from hpuopt.pipeline import registry

ROOT = Path(__file__).resolve().parents[1]
USER_GUIDE = ROOT / "docs" / "user_guide.md"
DOCS = ROOT / "docs"
PASS_DIR = ROOT / "docs" / "passes"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"

# Environment variables of the project that are not options (the test suite's own switch).
NON_OPTION_VARIABLES: set[str] = set()
# Keyword arguments of option-taking calls that are not hpuopt options.
NON_OPTION_KEYWORDS = {
    "compile": {"dynamic", "fullgraph", "backend", "mode", "options", "disable"},
    "wrap_in_hpu_graph": set(),
    "ModuleCacher": set(),
    "wrap_submodules": {"names", "types"},
    "Config": set(),
    "replace": set(),
}
FIELDS = set(Config.field_names())


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.md", USER_GUIDE, *sorted(PASS_DIR.glob("*.md"))]
    if TROUBLESHOOTING.exists():
        pages.append(TROUBLESHOOTING)
    return pages


def all_pages() -> list[Path]:
    """Every page a user may read: the option checks' pages, the rest of ``docs/`` and the
    benchmarks' README (commands, flags and counters are checked on all of them)."""
    pages = [*doc_pages(), *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]
    return list(dict.fromkeys(p for p in pages if p.exists()))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- parsing ----------------------------------------------------------------------------------

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in _FENCE.finditer(text)]


def python_sources(text: str) -> list[str]:
    """The Python of every ``python`` block, and the input lines of every ``pycon`` block."""
    out = []
    for lang, body in code_blocks(text):
        if lang in ("python", "py"):
            out.append(body)
        elif lang == "pycon":
            lines = [ln[4:] for ln in body.splitlines() if ln.startswith((">>> ", "... "))]
            out.append("\n".join(lines))
    return out


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables outside code blocks, as ``(header cells, rows of cells)``."""
    prose = _FENCE.sub("", text)
    found, block = [], []
    for line in [*prose.splitlines(), ""]:
        if line.strip().startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2 and re.fullmatch(r"\|?[\s:|-]+\|?", block[1].strip()):
            cells = [_cells(row) for row in block]
            found.append((cells[0], cells[2:]))
        block = []
    return found


def _cells(row: str) -> list[str]:
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|"):
        row = row[:-1]
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def option_table(text: str) -> list[list[str]]:
    """The rows of every table whose first header cell is ``option``."""
    rows = []
    for header, body in tables(text):
        if header and header[0].lower() == "option":
            rows.extend(body)
    return rows


def _ticked(cell: str) -> str | None:
    m = re.fullmatch(r"`([^`]+)`", cell.strip())
    return m.group(1) if m else None


def names_in_option_tables(text: str) -> list[str]:
    names = []
    for row in option_table(text):
        name = _ticked(row[0])
        assert name is not None, f"option table row does not start with a `name`: {row}"
        names.append(name)
    return names


def names_in_env_variables(text: str) -> list[str]:
    out = []
    for var in re.findall(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+\b", text):
        if var in NON_OPTION_VARIABLES:
            continue
        out.append(var[len(ENV_PREFIX):].lower())
    return out


def names_in_options_dicts(text: str) -> list[str]:
    """Keys of every ``options={...}`` / ``options = {...}`` literal, in code or prose."""
    out = []
    for m in re.finditer(r"\boptions\s*=\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        body = text[m.end(): i - 1]
        # keys at the top level of the literal only: drop nested brackets, innermost first
        nested = re.compile(r"[\[({][^\[\](){}]*[\])}]")
        while nested.search(body):
            body = nested.sub("", body)
        out.extend(re.findall(r"""["']([A-Za-z_][A-Za-z0-9_]*)["']\s*:""", body))
    return out


def names_in_calls(source: str) -> list[str]:
    """Keyword names of option-taking calls in one Python code block."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        owner = func.value if isinstance(func, ast.Attribute) else None
        owner_name = getattr(owner, "id", None) or getattr(owner, "attr", None)
        if name == "compile" and owner_name != "hpuopt":
            continue  # torch.compile: its options come through options={...}
        if name == "replace" and owner_name not in ("config", "cfg", "Config"):
            continue
        if name not in NON_OPTION_KEYWORDS:
            continue
        for kw in node.keywords:
            if kw.arg is not None and kw.arg not in NON_OPTION_KEYWORDS[name]:
                out.append(kw.arg)
    return out


def option_names(text: str) -> set[str]:
    names = set(names_in_option_tables(text))
    names |= set(names_in_env_variables(text))
    names |= set(names_in_options_dicts(text))
    for source in python_sources(text):
        names |= set(names_in_calls(source))
    return names


# -- the parser itself ------------------------------------------------------------------------


def test_parser_finds_every_kind_of_mention():
    text = (
        "Set `HPUOPT_STRICT=1` or HPUOPT_NOT_A_THING.\n\n"
        "| option | variable |\n| --- | --- |\n| `max_graphs` | x |\n| `bogus_table` | y |\n\n"
        "```python\n"
        "torch.compile(m, backend='hpugraph', options={'bogus_dict': 1, \"padding\": {'a': 2}})\n"
        "hpuopt.compile(m, dynamic=True, bogus_kw=3)\n"
        "hpuopt.ModuleCacher(max_graphs=10)(model=m, inplace=True)\n"
        "hpuopt.wrap_submodules(m, names=['a'], bogus_wrap=1)\n"
        "```\n"
        "```\nnot python: options={'bogus_output': 1}\n```\n"
        "```pycon\n>>> hpuopt.wrap_in_hpu_graph(m, bogus_pycon=1)\n<output>\n```\n"
    )
    assert option_names(text) == {
        "strict", "not_a_thing", "max_graphs", "bogus_table", "bogus_dict", "padding",
        "bogus_kw", "bogus_wrap", "bogus_output", "bogus_pycon",
    }


def test_parser_reads_a_table_inside_a_list_of_tables():
    text = "| counter | counts |\n| --- | --- |\n| `replays` | x |\n\n| option | v |\n|---|---|\n| `a` | 1 |\n"
    assert names_in_option_tables(text) == ["a"]  # the counter table is not an option table


# -- the checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", doc_pages(), ids=_rel)
def test_pages_name_only_real_options(page):
    text = page.read_text()
    unknown = option_names(text) - FIELDS
    assert not unknown, f"{_rel(page)} names options Config does not have: {sorted(unknown)}"


@pytest.mark.parametrize("page", doc_pages(), ids=_rel)
def test_python_blocks_parse(page):
    for source in python_sources(page.read_text()):
        try:
            ast.parse(source)
        except SyntaxError as exc:
            pytest.fail(f"{_rel(page)}: a python block does not parse ({exc}):\n{source}")


@pytest.mark.parametrize("page", doc_pages(), ids=_rel)
def test_disable_passes_names_real_passes(page):
    text = page.read_text()
    passes = set(registry())
    named = set()
    for m in re.finditer(r"disable_passes\"?'?\s*[:=]\s*\[([^\]]*)\]", text):
        named |= set(re.findall(r"""["']([^"']+)["']""", m.group(1)))
    for m in re.finditer(ENV_PREFIX + r"DISABLE_PASSES=([A-Za-z0-9_,]+)", text):
        named |= {n for n in m.group(1).split(",") if n}
    assert named <= passes, f"{_rel(page)} disables unknown passes {sorted(named - passes)}"


def _render_default(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_user_guide_documents_every_option_with_variable_and_default():
    rows = option_table(USER_GUIDE.read_text())
    assert rows, "docs/user_guide.md has no option table (first header cell: option)"
    by_name: dict[str, list[str]] = {}
    for row in rows:
        name = _ticked(row[0])
        assert name not in by_name, f"option {name} has two rows"
        by_name[name] = row
    missing = FIELDS - set(by_name)
    assert not missing, f"docs/user_guide.md does not document {sorted(missing)}"
    assert list(by_name) == Config.field_names(), "option table is not in Config's field order"
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for name, row in by_name.items():
        assert len(row) == 5, f"row of {name} should be: option | variable | type | default | meaning"
        _, variable, kind, default, meaning = row
        assert _ticked(variable) == ENV_PREFIX + name.upper(), f"{name}: variable cell {variable!r}"
        assert _ticked(default) == _render_default(defaults[name]), (
            f"{name}: documented default {default!r}, Config has {defaults[name]!r}"
        )
        assert kind and meaning, f"{name}: empty type or meaning"


def test_every_pass_has_a_page_and_every_page_a_pass():
    pages = {p.stem for p in PASS_DIR.glob("*.md")}
    passes = set(registry())
    assert passes - pages == set(), f"passes without a page in docs/passes/: {sorted(passes - pages)}"
    assert pages - passes == set(), f"pages for passes not in the registry: {sorted(pages - passes)}"


@pytest.mark.parametrize("name", sorted(registry()))
def test_pass_page_describes_its_pass(name):
    page = PASS_DIR / f"{name}.md"
    if not page.exists():
        pytest.skip("reported by test_every_pass_has_a_page_and_every_page_a_pass")
    text = page.read_text()
    p = registry()[name]
    title = text.splitlines()[0]
    assert title.startswith("# ") and f"`{name}`" in title, f"{page.name}: title must name `{name}`"
    assert type(p).__name__ in text, f"{page.name} does not name its class {type(p).__name__}"
    assert f"`{p.stage}`" in text, f"{page.name} does not give its stage `{p.stage}`"
    assert re.search(r"disable_passes[\"']?\s*[:=]\s*\[\s*[\"']" + re.escape(name), text), (
        f"{page.name} does not say how to disable it"
    )
    for heading in ("## What it finds", "## What it changes", "## What it guarantees", "## Before and after"):
        assert heading in text, f"{page.name} lacks the section {heading!r}"


def test_user_guide_links_resolve():
    for page in [USER_GUIDE, *sorted(PASS_DIR.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{_rel(page)} links to missing {target}"


# -- commands: scripts, flags, make targets ---------------------------------------------------

SCRIPT_DIRS = ("examples", "benchmarks", ".ci")
# A documented flag a script does not have, left in a page this project does not edit here; each
# entry must still be needed (the test fails once the page is fixed, so the entry goes too).
KNOWN_FLAG_DRIFT: dict[tuple[str, str], str] = {}
# Commands of other tools whose flags are not ours.
FOREIGN_COMMANDS = ("pip", "pytest", "torchrun", "git", "TORCH_LOGS", "apt", "uv ", "conda")


def repo_scripts() -> dict[str, Path]:
    """Every script of the repository, by its path relative to the root."""
    out = {}
    for d in SCRIPT_DIRS:
        for path in sorted((ROOT / d).glob("*.py")):
            out[_rel(path)] = path
    return out


def script_flags(path: Path) -> set[str] | None:
    """The option strings of a script's argparse parser, read from its ``add_argument`` calls
    (``--no-x`` too for a ``BooleanOptionalAction``); a benchmark that builds its parser with
    ``harness.parser`` also takes the harness's options. None for a script without a parser."""
    tree = ast.parse(path.read_text())
    flags: set[str] = set()
    parser = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name == "ArgumentParser":
                parser = True
            if name == "parser" and getattr(node.func, "value", None) is not None and (
                getattr(node.func.value, "id", None) == "harness"
            ):
                parser = True
                flags |= script_flags(path.parent / "harness.py") or set()
            if name == "add_argument":
                flags |= _option_strings(path, node)
    return flags | {"-h", "--help"} if parser else None


def _option_strings(path: Path, call: ast.Call) -> set[str]:
    out = set()
    for arg in call.args:
        assert isinstance(arg, ast.Constant), f"{_rel(path)}: a computed option name"
        if isinstance(arg.value, str) and arg.value.startswith("-"):
            out.add(arg.value)
    boolean = any(
        k.arg == "action" and getattr(k.value, "attr", None) == "BooleanOptionalAction"
        for k in call.keywords
    )
    if boolean:
        out |= {"--no-" + f[2:] for f in out if f.startswith("--")}
    return out


def _code_spans(text: str) -> list[tuple[str, str]]:
    """``(context, code)`` for every piece of code a page shows: each line of a fenced block
    that is not Python, and each inline code span. ``context`` is the paragraph around an
    inline span (or the text before a block) plus the section heading above it."""
    out = []
    heading = ""
    pos = 0
    for m in _FENCE.finditer(text):
        out.extend(_inline_spans(text[pos:m.start()], heading))
        heading = _last_heading(text[:m.start()]) or heading
        lang, body = m.group(1).strip().lower(), m.group(2)
        if lang not in ("python", "py", "pycon"):
            before = text[:m.start()].rstrip().split("\n\n")[-1]
            lines = [re.sub(r"(^|\s)#.*$", "", line) for line in body.splitlines()]
            out.extend((f"{heading}\n{before}", line) for line in lines if line.strip())
        pos = m.end()
    out.extend(_inline_spans(text[pos:], heading))
    return out


def _last_heading(text: str) -> str | None:
    found = re.findall(r"^#+ .*$", text, re.M)
    return found[-1] if found else None


def _inline_spans(prose: str, heading: str) -> list[tuple[str, str]]:
    out = []
    for para in re.split(r"\n\s*\n", prose):
        head = _last_heading(prose[: prose.find(para)]) or heading
        for code in re.findall(r"`([^`\n]+)`", para):
            out.append((f"{head}\n{para}", code))
    return out


_INVOCATION = re.compile(
    r"(?:^|[\s;(])(?:\$\(PY\)|\$\(GPU_PYTHON\)|python[0-9.]*)\s+((?:[\w.-]+/)*[\w-]+\.py)"
    r"((?:[ \t]+(?!#)[^\s`#|;&)]+)*)"
)
_MAKE = re.compile(r"(?:^|[\s;(])make\s+([a-z][\w-]*)((?:[ \t]+[A-Z_]+=\S*)*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def commands(page: Path) -> tuple[list, list, list]:
    """``(invocations, make calls, loose flags)`` shown on a page."""
    invocations, makes, loose = [], [], []
    for context, code in _code_spans(page.read_text()):
        if any(cmd in code for cmd in FOREIGN_COMMANDS):
            continue
        covered = []
        for m in _INVOCATION.finditer(code):
            invocations.append((m.group(1), m.group(2).split()))
            covered.append(m.span())
        for m in _MAKE.finditer(code):
            makes.append((m.group(1), re.findall(r"([A-Z_]+)=", m.group(2))))
        for m in _FLAG.finditer(code):
            if not any(a <= m.start() < b for a, b in covered):
                loose.append((m.group(1), context))
    return invocations, makes, loose


def _scripts_named(context: str, scripts: dict[str, Path]) -> list[str]:
    """The scripts a paragraph names: by path, by file name, or all of a directory it names."""
    named = []
    for rel in scripts:
        if rel in context or re.search(r"(?<![\w/])" + re.escape(Path(rel).name), context):
            named.append(rel)
    for d in SCRIPT_DIRS:
        if re.search(r"`" + re.escape(d) + r"/`", context):
            named.extend(
                r for r in scripts if r.startswith(d + "/") and not Path(r).name.startswith("_")
            )
    return list(dict.fromkeys(named))


def flag_problems(page: Path) -> list[str]:
    scripts = repo_scripts()
    flags = {rel: script_flags(path) for rel, path in scripts.items()}
    invocations, _, loose = commands(page)
    problems = []
    for script, args in invocations:
        if script not in scripts:
            problems.append(f"runs {script}, which does not exist")
            continue
        known = flags[script] or {"-h", "--help"}
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag.startswith("-") and flag not in known:
                problems.append(f"runs {script} with {flag}, which it does not take")
    everything = set().union(*(f for f in flags.values() if f))
    for flag, context in loose:
        with_parser = [r for r in _scripts_named(context, scripts) if flags[r]]
        if with_parser:
            lacking = [r for r in with_parser if flag not in flags[r]]
            if lacking:
                problems.append(f"names {flag}, which {', '.join(lacking)} does not take")
        elif flag not in everything:
            problems.append(f"names {flag}, which no script takes")
    return list(dict.fromkeys(problems))


def makefile_targets() -> tuple[set[str], str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M)), text


@pytest.mark.parametrize("page", all_pages(), ids=_rel)
def test_commands_name_real_scripts_and_flags(page):
    problems = flag_problems(page)
    for (where, flag), why in KNOWN_FLAG_DRIFT.items():
        if where == _rel(page):
            matching = [p for p in problems if f" {flag}," in p]
            assert matching, f"{where}: the known drift of {flag} ({why}) is fixed: drop the entry"
            problems = [p for p in problems if p not in matching]
    assert not problems, f"{_rel(page)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", all_pages(), ids=_rel)
def test_make_commands_name_real_targets(page):
    targets, text = makefile_targets()
    _, makes, _ = commands(page)
    for target, variables in makes:
        assert target in targets, f"{_rel(page)} runs `make {target}`: no such Makefile target"
        for var in variables:
            assert f"$({var})" in text, f"{_rel(page)} sets {var} for make: the Makefile ignores it"


def test_flag_parser_catches_a_missing_flag(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python examples/demo.py --no-such-flag` or\n\n"
        "```bash\npython benchmarks/overhead.py --quick --bogus 3   # a comment --ignored\n"
        "python examples/missing.py\nmake no-such-target DRY_RUN=1\n```\n\n"
        "Every script in `examples/` has `--quick`.\n\n"
        "The demo (`examples/demo.py`) takes `--device` and `--nonsense`.\n"
    )
    problems = flag_problems(page)
    assert any("demo.py with --no-such-flag" in p for p in problems), problems
    assert any("overhead.py with --bogus" in p for p in problems), problems
    assert not any("--quick" in p and "overhead" in p for p in problems), problems
    assert any("examples/missing.py, which does not exist" in p for p in problems), problems
    assert any("--quick, which" in p and "mnist_training" in p for p in problems), problems
    assert any("--nonsense, which examples/demo.py" in p for p in problems), problems
    assert not any("--device" in p for p in problems), problems
    assert not any("--ignored" in p for p in problems), problems
    _, makes, _ = commands(page)
    assert ("no-such-target", ["DRY_RUN"]) in makes


def test_every_example_takes_short_as_the_user_guide_says():
    for rel, path in repo_scripts().items():
        if rel.startswith("examples/") and not path.name.startswith("_"):
            assert "--short" in (script_flags(path) or set()), f"{rel} lacks --short"


# -- counters ---------------------------------------------------------------------------------


def _counter_names() -> tuple[set[str], set[str]]:
    from hpuopt.diagnostics.counters import Counters

    fields = {f.name for f in dataclasses.fields(Counters)}
    members = {n for n in dir(Counters) if not n.startswith("_")}
    return fields, fields | members


def counters_named(text: str) -> set[str]:
    """Counter names a page uses: the counter table's first column, ``counters.<name>`` and the
    keywords of ``counters.expect(...)``."""
    names = set()
    for header, rows in tables(text):
        if header and header[0].lower() == "counter":
            for row in rows:
                names |= set(re.findall(r"`([^`]+)`", row[0]))
    names |= set(re.findall(r"\bcounters\.([A-Za-z_]\w*)", text))
    for m in re.finditer(r"\bcounters\.expect\(([^)]*)\)", text):
        names |= set(re.findall(r"(\w+)\s*=", m.group(1)))
    return names


def test_counter_parser_finds_table_attribute_and_expect_names():
    text = (
        "| counter | counts |\n| --- | --- |\n| `replays`, `bogus_a` | x |\n\n"
        "`hpuopt.counters.bogus_b` and `counters.expect(bogus_c=1, replays=2)`\n"
    )
    _, allowed = _counter_names()
    assert counters_named(text) - allowed == {"bogus_a", "bogus_b", "bogus_c"}


@pytest.mark.parametrize("page", all_pages(), ids=_rel)
def test_pages_name_only_real_counters(page):
    _, allowed = _counter_names()
    unknown = counters_named(page.read_text()) - allowed
    assert not unknown, f"{_rel(page)} names counters that do not exist: {sorted(unknown)}"


def test_user_guide_counter_table_lists_every_counter():
    fields, _ = _counter_names()
    listed = set()
    for header, rows in tables(USER_GUIDE.read_text()):
        if header and header[0].lower() == "counter":
            for row in rows:
                listed |= set(re.findall(r"`([^`]+)`", row[0]))
    assert fields <= listed, f"the user guide's counter table lacks {sorted(fields - listed)}"


# -- links to sections ------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose = _FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}


@pytest.mark.parametrize("page", all_pages(), ids=_rel)
def test_section_links_resolve(page):
    prose = _FENCE.sub("", page.read_text())
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", prose):
        if "://" in target:
            continue
        dest = (page.parent / target) if target else page
        assert dest.exists(), f"{_rel(page)} links to missing {target}"
        assert anchor in anchors(dest), f"{_rel(page)} links to {target}#{anchor}: no such section"


def test_explain_links_only_to_real_troubleshooting_sections():
    from hpuopt.diagnostics import wording

    assert wording.TROUBLESHOOTING == _rel(TROUBLESHOOTING)
    missing = set(wording.TOPICS.values()) - anchors(TROUBLESHOOTING)
    assert not missing, f"explain() links to sections troubleshooting.md lacks: {sorted(missing)}"


# -- snippets and what they print -------------------------------------------------------------


def snippets_with_output(text: str) -> list[tuple[str, str]]:
    """``(python, expected text)`` for every python block followed directly by a text block
    (nothing between them but, at most, a line saying it ``prints``)."""
    blocks = list(_FENCE.finditer(text))
    out = []
    for m, nxt in zip(blocks, blocks[1:]):
        between = text[m.end():nxt.start()].strip()
        if (
            m.group(1).strip().lower() in ("python", "py")
            and nxt.group(1).strip().lower() == "text"
            and (not between or re.fullmatch(r"prints[^\n]{0,40}", between))
        ):
            out.append((m.group(2), nxt.group(2)))
    return out


def _all_snippets() -> list:
    params = []
    for page in all_pages():
        for i, (source, expected) in enumerate(snippets_with_output(page.read_text())):
            params.append(pytest.param(source, expected, id=f"{_rel(page)}-{i}"))
    return params


def _normalise(line: str) -> str:
    return re.sub(r"\d+(?:\.\d+)?", "#", line.rstrip())


def missing_lines(expected: str, printed: str) -> list[str]:
    got = [_normalise(ln) for ln in printed.splitlines()]
    missing = []
    for line in expected.splitlines():
        if not line.strip():
            continue
        pattern = ".*".join(re.escape(part) for part in _normalise(line).split("..."))
        if not any(re.fullmatch(pattern, g) for g in got):
            missing.append(line)
    return missing


def test_missing_lines_ignores_numbers_and_honours_ellipses():
    printed = "hpuopt: 2 Dynamo graphs, called 18 times\n  held: 14 graphs, 65.1 KiB\n"
    shown = "hpuopt: 3 Dynamo graphs, called 9 times\n  held: ... KiB\n"
    assert missing_lines(shown, printed) == []
    assert missing_lines("  held: 14 graphs, 1 MiB\n", printed) == ["  held: 14 graphs, 1 MiB"]


def run_snippet(source: str, directory: Path) -> str:
    """Runs ``source`` as ``model.py`` in ``directory`` (its working directory), in this process,
    and returns what it printed. Dynamo's config is restored after."""
    import contextlib
    import io
    import os
    import runpy

    import torch._dynamo

    path = directory / "model.py"
    path.write_text(source)
    before = torch._dynamo.config.get_config_copy()
    cwd = os.getcwd()
    printed = io.StringIO()
    try:
        os.chdir(directory)
        with contextlib.redirect_stdout(printed), __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            runpy.run_path(str(path), run_name="__main__")
    finally:
        os.chdir(cwd)
        after = torch._dynamo.config.get_config_copy()
        for key, value in before.items():
            if after.get(key) is not value and after.get(key) != value:
                setattr(torch._dynamo.config, key, value)
    return printed.getvalue()


@pytest.mark.parametrize("source, expected", _all_snippets())
def test_snippet_runs_and_prints_what_the_page_shows(source, expected, tmp_path):
    printed = run_snippet(source, tmp_path)
    missing = missing_lines(expected, printed)
    assert not missing, "the page shows lines the snippet does not print:\n" + "\n".join(
        missing) + "\n--- printed:\n" + printed


def test_troubleshooting_has_a_snippet_per_symptom():
    text = TROUBLESHOOTING.read_text()
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        if title == "Dynamo recompiles":
            continue  # causes listed; the snippets of "too many graphs" show one
        assert "```python" in section, f"troubleshooting.md: {title!r} has no runnable snippet"
