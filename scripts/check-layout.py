#!/usr/bin/env python3
"""Draws the imports between the files of src/ and fails on a cycle or on
an arrow that points up the flow.

Every path a file names (in `use` trees and inline, `crate::…`,
`super::…`, and `blocksnap::…` in the binary) is resolved to the file
that defines it. A `mod` declaration is ownership, not an import, so a
folder's `mod.rs` that only declares its files is reached by nobody.

The rooms, from the top (see the crate docs in src/lib.rs):

    cli -> server -> lifecycle -> image -> lazy -> ops -> region -> store | volume -> format -> foundation

A file may use its own room (without cycles), the rooms below it and the
foundation (error, id, progress, settings, sys); `store` and `volume` sit
side by side and do not use each other.

Usage: scripts/check-layout.py [--dot]   (--dot prints the graph)
"""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Rank of each room; a file may only use ranks at or below its own, and a
# room of the same rank only if it is its own room.
RANKS = {
    "foundation": 0,
    "format": 1,
    "store": 2,
    "volume": 2,
    "region": 3,
    "ops": 4,
    "lazy": 5,
    "image": 6,
    "lifecycle": 7,
    "server": 8,
    "crate": 9,  # lib.rs: the crate docs and re-exports
    "cli": 10,
    "main": 11,
}
FOUNDATION = {"error", "id", "progress", "settings", "sys"}


def modules():
    """(crate, module path) -> file, for the library and the binary."""
    found = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts == ["lib"]:
                found[("lib", ())] = rel
            elif parts == ["main"]:
                found[("bin", ())] = rel
            elif parts[0] == "cli":
                found[("bin", tuple(parts))] = rel
            else:
                found[("lib", tuple(parts))] = rel
    return found


def room(crate, path):
    if crate == "bin":
        return "cli" if path else "main"
    if not path:
        return "crate"
    return "foundation" if path[0] in FOUNDATION else path[0]


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return "\n".join(line.split("//")[0] for line in text.split("\n"))


def use_paths(tree, prefix=()):
    """Expands a `use` tree into full paths."""
    tree = tree.strip()
    depth, parts, cur = 0, [], ""
    # Split the head (before a top-level `{`) from the group.
    m = re.match(r"^([\w:]*?)(?:::)?\{(.*)\}$", tree, re.S)
    if m:
        head = [p for p in m.group(1).split("::") if p]
        inner = m.group(2)
        for ch in inner:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        out = []
        for p in parts:
            if p.strip():
                out += use_paths(p, prefix + tuple(head))
        return out
    name = re.split(r"\s+as\s+", tree)[0].strip()
    segs = [s for s in name.split("::") if s]
    if segs and segs[-1] == "self":
        segs = segs[:-1]
    return [prefix + tuple(segs)]


def references(text):
    text = strip_comments(text)
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths += use_paths(m.group(1))
    body = re.sub(r"\buse\s+[^;]+;", "", text)
    for m in re.finditer(r"\b((?:crate|super|blocksnap)(?:::\w+)+)", body):
        paths.append(tuple(m.group(1).split("::")))
    return paths


def resolve(mods, crate, here, path):
    """The file a path names, or None for an outside crate."""
    if not path:
        return None
    if path[0] == "crate":
        target_crate, rest = crate, list(path[1:])
    elif path[0] == "blocksnap" and crate == "bin":
        target_crate, rest = "lib", list(path[1:])
    elif path[0] in ("super", "self"):
        target_crate, base = crate, list(here)
        rest = list(path)
        while rest and rest[0] in ("super", "self"):
            if rest.pop(0) == "super":
                base = base[:-1]
        rest = base + rest
    else:
        return None
    for n in range(len(rest), -1, -1):
        key = (target_crate, tuple(rest[:n]))
        if key in mods:
            return key
    return None


def main():
    mods = modules()
    edges = {}
    for key, rel in mods.items():
        crate, path = key
        here = path  # a file's own module: `super` is its parent
        text = open(os.path.join(ROOT, rel)).read()
        targets = set()
        # An inline `mod tests { … }` (last in a file) is a module inside
        # the file: there `super` is the file itself.
        code, _, tests = (re.split(r"(\bmod\s+tests\s*\{)", text, maxsplit=1) + ["", ""])[:3]
        for part, inner in ((code, here), (tests, here + ("tests",))):
            for ref in references(part):
                t = resolve(mods, crate, inner, ref)
                if t and t != key:
                    targets.add(t)
        edges[key] = targets

    name = lambda k: mods[k]
    problems = []
    for a, ts in edges.items():
        for b in ts:
            ra, rb = room(*a), room(*b)
            if RANKS[rb] > RANKS[ra] or (RANKS[rb] == RANKS[ra] and ra != rb):
                problems.append(f"{name(a)} -> {name(b)}: {ra} may not use {rb}")

    # Cycles: Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
            if len(comp) > 1:
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    for comp in sccs:
        problems.append("cycle: " + " <-> ".join(sorted(name(k) for k in comp)))

    if "--dot" in sys.argv:
        print("digraph imports {")
        for a, ts in sorted(edges.items()):
            for b in sorted(ts):
                print(f'  "{name(a)}" -> "{name(b)}";')
        print("}")
    n_edges = sum(len(t) for t in edges.values())
    if problems:
        for p in problems:
            print("layout:", p, file=sys.stderr)
        print(f"layout: {len(problems)} problems in {len(mods)} files", file=sys.stderr)
        return 1
    print(f"layout: {len(mods)} files, {n_edges} imports, no cycle, every arrow points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
