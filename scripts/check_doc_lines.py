#!/usr/bin/env python3
"""The docs' "paper line" tables (docs/v1.md, v2.md, backward.md) point at code lines: `:N` or `:N-M` in a column
headed by a source file. The kernels mark the paper's algorithm with `// line K` comments, so a reference is right
when the lines it names (give or take 3) mention one of its row's paper lines K ("line K", "lines K-L", "lines K and
L"). Every cell that names lines must have at least one such reference; anything else is reported with the lines
the code now has for that paper line. Run by CI: code moves, and a table that points at the wrong lines is worse
than none. Exit 1 on any stale cell.

    python3 scripts/check_doc_lines.py [docs/*.md]
"""
import glob, os, re, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLACK = 3
MENTION = re.compile(r"\blines? (\d+(?:\s*(?:-|,|and)\s*\d+)*)", re.IGNORECASE)  # "line 5", "lines 10, 11 and 13"


def paper_lines(cell):
    """'1-2' -> {1, 2}; '10, 13' -> {10, 13}; '12-15' -> {12..15}; '(extra)' -> set()."""
    out = set()
    for a, b in re.findall(r"(\d+)(?:\s*-\s*(\d+))?", cell):
        out.update(range(int(a), int(b or a) + 1))
    return out


def mentions(line):
    """The paper lines a code line's comment names ("lines 12-15" names 12 to 15)."""
    if "//" not in line:
        return set()
    out = set()
    for group in MENTION.findall(line.split("//", 1)[1]):
        for a, b in re.findall(r"(\d+)(?:\s*-\s*(\d+))?", group):
            lo, hi = int(a), int(b or a)
            out.update(range(lo, hi + 1) if hi - lo < 8 else (lo, hi))
    return out


def where(code, k):
    return [i + 1 for i, line in enumerate(code) if k in mentions(line)]


def check(doc):
    stale = 0
    lines = open(doc).read().splitlines()
    files = None
    for n, row in enumerate(lines, 1):
        cells = [c.strip() for c in row.strip().strip("|").split("|")] if row.startswith("|") else None
        if cells and cells[0] == "paper line":
            files = [re.search(r"`([\w/.]+\.(?:cu|cuh|h))`", c) for c in cells]
            files = [m.group(1) if m else None for m in files]
            continue
        if not cells:
            files = None
            continue
        if files is None or set(cells[0]) <= set("-: "):
            continue
        want = paper_lines(cells[0])
        if not want:
            continue
        for cell, path in zip(cells, files):
            if path is None:
                continue
            refs = [(int(a), int(b or a)) for a, b in re.findall(r"`:(\d+)(?:-(\d+))?", cell)]
            if not refs:
                continue
            code = open(os.path.join(ROOT, path)).read().splitlines()
            ok = any(want & mentions(code[i - 1])
                     for lo, hi in refs for i in range(max(1, lo - SLACK), min(len(code), hi + SLACK) + 1))
            if not ok:
                stale += 1
                now = sorted({i for k in want for i in where(code, k)})
                print(f"{os.path.relpath(doc, ROOT)}:{n}: paper line {cells[0]}: {path} refs "
                      f"{', '.join(f'{a}-{b}' if a != b else str(a) for a, b in refs)} name none of its lines; "
                      f"the code marks them at {now or 'no line'}")
    return stale


def main():
    docs = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    stale = sum(check(d) for d in docs)
    print(f"check_doc_lines: {stale} stale reference{'s' if stale != 1 else ''}" if stale else
          "check_doc_lines: every paper-line table points at its lines")
    return 1 if stale else 0


sys.exit(main())
