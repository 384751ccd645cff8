#!/usr/bin/env python3
"""The relay's module graph: which module of a crate refers to which, and whether it has a cycle.

    python3 .ci/module_graph.py [CRATE_SRC_DIR ...]     # default: src
    python3 .ci/module_graph.py --dot src > graph.dot   # the graph, for Graphviz

A node is a module (a file: `src/pipeline/poller.rs` is `pipeline::poller`, `mod.rs` is its folder's
module). An edge a → b means a's code names b: a `crate::b…` or `super::…` path that resolves to b,
or a `use` of it. Tests (`#[cfg(test)] mod tests { … }` at a file's end) are left out: a test may
reach anywhere. A module's own children are not edges (a parent declares its children), nor are
references from a child to an ancestor that only re-exports.

It also checks the layers: the layout table at the top of the crate root (`lib.rs`), whose rows
read `//! | 2 | [`cloudflare`] | ... |` (a layer number, or `tools` for the top, then the
top-level modules of that layer), declares an order, with the binary's own modules (declared
in `main.rs`) on top; an edge from a module to one of a higher layer is an error. A module not in the table is an error too, so a new folder gets a layer.

Exit status 1 when the graph has a cycle or an upward edge, each one listed.
"""

from __future__ import annotations

import pathlib
import re
import sys

PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)::((?:[A-Za-z_][A-Za-z0-9_]*::)*)\{([^;]*)\};", re.S)
TEST_MOD_RE = re.compile(r"^#\[cfg\(test\)\]\s*\n\s*mod\s+\w+\s*\{", re.M)


def module_of(src: pathlib.Path, file: pathlib.Path) -> tuple[str, ...]:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip(text: str) -> str:
    """The code without comments, string and char literals, and the trailing test module."""
    m = TEST_MOD_RE.search(text)
    if m:
        text = text[: m.start()]
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def resolve(mod: tuple[str, ...], root: str, rest: list[str], modules: set) -> tuple[str, ...] | None:
    if root == "crate":
        base: tuple[str, ...] = ()
    elif root == "super":
        base = mod[:-1]
        while rest and rest[0] == "super":
            base = base[:-1]
            rest = rest[1:]
    else:
        base = mod
    best = None
    path = base
    if path in modules:
        best = path
    for seg in rest:
        path = path + (seg,)
        if path in modules:
            best = path
        else:
            break
    return best


def graph(src: pathlib.Path) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    files = [f for f in src.rglob("*.rs") if "bin" not in f.relative_to(src).parts[:-1]]
    files = [f for f in files if f.name != "main.rs"]
    modules = {module_of(src, f): f for f in files}
    edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in modules}
    for mod, file in modules.items():
        text = strip(file.read_text())
        refs: list[tuple[str, list[str]]] = []
        for m in USE_GROUP_RE.finditer(text):
            prefix = [s for s in m.group(2).split("::") if s]
            for item in m.group(3).split(","):
                item = item.strip().split(" as ")[0].strip()
                if not item or item.startswith("{"):
                    continue
                refs.append((m.group(1), prefix + item.split("::")))
        for m in PATH_RE.finditer(text):
            refs.append((m.group(1), m.group(2).strip(":").split("::")))
        for root, rest in refs:
            target = resolve(mod, root, rest, set(modules))
            if target is None or target == mod:
                continue
            # A parent names its children (mod declarations, re-exports); a child naming an
            # ancestor is a real edge only when it is not the crate root's re-export.
            if target[: len(mod)] == mod:
                continue
            if target == ():
                continue
            edges[mod].add(target)
    return edges


def sccs(edges):
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    out: list = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


LAYER_ROW_RE = re.compile(r"^//!\s*\|\s*(\d+|tools)\s*\|([^|]*)\|", re.M)
LAYER_NAME_RE = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")

# Upward edges tolerated while a change that removes them is in flight (reported, not failed).
# None now: every edge points down.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def layers(src: pathlib.Path) -> dict[str, int]:
    """Top-level module -> layer, from the crate root's layout table (empty when it has none)."""
    root = src / "lib.rs"
    if not root.exists():
        return {}
    table: dict[str, int] = {}
    rows = LAYER_ROW_RE.findall(root.read_text())
    top = max((int(n) for n, _ in rows if n != "tools"), default=0) + 1
    for number, names in rows:
        for module in LAYER_NAME_RE.findall(names):
            table[module] = top if number == "tools" else int(number)
    # The binary's own modules (`mod cli;` in main.rs) sit above the library.
    main = src / "main.rs"
    if table and main.exists():
        for module in re.findall(r"^\s*(?:pub\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", strip(main.read_text()), re.M):
            table[module] = top + 1
    return table


def upward_edges(edges, table: dict[str, int]):
    """(from, to, from's layer, to's layer) for every edge that points up; modules missing
    from the table as (module, None, None, None)."""
    out = []
    missing = sorted({m[0] for m in edges if m and m[0] not in table})
    for m in missing:
        out.append(((m,), None, None, None))
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if not a or not b or a[0] == b[0]:
                continue
            la, lb = table.get(a[0]), table.get(b[0])
            if la is not None and lb is not None and lb > la:
                out.append((a, b, la, lb))
    return out


def name(m: tuple[str, ...]) -> str:
    return "::".join(m) or "crate"


def main(argv: list[str]) -> int:
    dot = "--dot" in argv
    dirs = [a for a in argv if a != "--dot"] or ["src"]
    failed = False
    for d in dirs:
        src = pathlib.Path(d)
        edges = graph(src)
        if dot:
            print("digraph modules {")
            for a in sorted(edges):
                for b in sorted(edges[a]):
                    print(f'  "{name(a)}" -> "{name(b)}";')
            print("}")
            continue
        cyclic = [sorted(c) for c in sccs(edges) if len(c) > 1]
        n_edges = sum(len(v) for v in edges.values())
        table = layers(src)
        if table:
            upward = upward_edges(edges, table)
            allowed = [u for u in upward if u[1] and (u[0][0], name(u[1])) in ALLOWED_UPWARD
                       or u[1] and (u[0][0], u[1][0]) in ALLOWED_UPWARD]
            for a, b, la, lb in upward:
                if b is None:
                    failed = True
                    print(f"{d}: module {name(a)} has no layer in the layout table of {src / 'lib.rs'}")
                elif (a, b, la, lb) in allowed:
                    print(f"{d}: known upward edge (being removed): {name(a)} (layer {la}) -> {name(b)} (layer {lb})")
                else:
                    failed = True
                    print(f"{d}: upward edge: {name(a)} (layer {la}) -> {name(b)} (layer {lb})")
            if not any(u not in allowed for u in upward):
                print(f"{d}: {len(table)} top-level modules in {len(set(table.values()))} layers, every edge points down")
        if cyclic:
            failed = True
            print(f"{d}: {len(edges)} modules, {n_edges} edges, {len(cyclic)} cycle(s):")
            for comp in cyclic:
                print("  " + " <-> ".join(name(m) for m in comp))
                for a in comp:
                    inside = sorted(b for b in edges[a] if b in comp)
                    print(f"    {name(a)} -> {', '.join(name(b) for b in inside)}")
        else:
            print(f"{d}: {len(edges)} modules, {n_edges} edges, no cycle")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
