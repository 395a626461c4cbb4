"""Properties of the source tree itself: citations that resolve, and no import cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llamakin"
DOCS = ROOT / "docs"

SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
DOC_FILE = re.compile(r"docs/([\w-]+\.md)")
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s")


def doc_sections(path: Path) -> set[str]:
    """Section numbers of a docs page: ``## 5. Qwen`` gives ``5``, ``### 5.1 Qwen v1`` gives ``5.1``."""
    return {m.group(1) for line in path.read_text().splitlines() if (m := HEADING.match(line))}


def citations(text: str) -> list[tuple[int, str | None, str]]:
    """Every ``§N.M`` of a text as (line number, the docs file named before it on its line, section)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in SECTION.finditer(line):
            named = DOC_FILE.findall(line[: match.start()])
            found.append((number, named[-1] if named else None, match.group(1)))
    return found


def test_every_section_citation_in_src_names_a_docs_file_and_resolves():
    sections = {page.name: doc_sections(page) for page in DOCS.glob("*.md")}
    count, problems = 0, []
    for path in sorted(SRC.rglob("*.py")):
        for line, page, section in citations(path.read_text()):
            count += 1
            where = f"{path.relative_to(ROOT)}:{line} §{section}"
            if page is None:
                problems.append(
                    f"{where} does not name its docs file (write 'docs/variants.md §{section}')"
                )
            elif page not in sections:
                problems.append(f"{where} cites docs/{page}, which does not exist")
            elif section not in sections[page]:
                problems.append(f"{where} has no heading numbered {section} in docs/{page}")
    assert count > 50  # the check saw the citations (guards against a broken pattern)
    assert not problems, "\n".join(problems)


def test_citation_check_catches_what_it_should():
    sections = doc_sections(DOCS / "variants.md")
    assert {"1.1", "5.1", "6.1", "7.4", "12"} <= sections and "13.9" not in sections
    assert citations("x (docs/variants.md §1.1, §6.2).\ny (§4)") == [
        (1, "variants.md", "1.1"),
        (1, "variants.md", "6.2"),
        (2, None, "4"),
    ]
    assert citations("spec §2.3.") == [(1, None, "2.3")]


def import_graph() -> dict[str, set[str]]:
    """llamakin module -> the llamakin modules it imports, at module level or inside functions."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        edges.add(f"{target}.{alias.name}")  # a submodule
                    elif target in modules:
                        edges.add(target)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles_among_llamakin_modules():
    graph = import_graph()
    assert "llamakin.checkpoint" in graph["llamakin.convert"]  # the graph sees real imports
    assert "llamakin.checkpoint" in graph["llamakin.cli"]  # ... also those inside functions
    assert "llamakin.model" in graph["llamakin.families.tables"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def readme_code_map() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout of the code") :]
    return section.split("```")[1]


def test_readme_code_map_matches_the_tree():
    code_map = readme_code_map()
    named = set(re.findall(r"[\w]+\.(?:py|md)\b", code_map))
    modules = {p.name for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"the README's code map does not name {missing}"
    existing = {
        p.name
        for folder in (SRC, ROOT / "tests", ROOT / "benchmarks", ROOT / "examples", DOCS)
        for p in folder.rglob("*")
        if p.suffix in (".py", ".md")
    }
    stale = sorted(named - existing)
    assert not stale, f"the README's code map names {stale}, which do not exist"
    folders = {p.name + "/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(re.findall(r"\b\w+/", code_map)), "a package is missing from the code map"
