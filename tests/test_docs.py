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
* every pass name a page gives to ``disable_passes`` is a real pass.
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
