#!/usr/bin/env python3
"""check_doc_refs: every `path:N` or `path:N-M` reference in the docs still points at the lines it pointed at when
it was written.

The docs tie their prose to code lines (`v2/forward_mma.cu:377-379`, `hopper.cuh:89`, and a bare `:623` for the file
the paragraph named last), and every edit above those lines moves them. For each reference this script asks git
which commit wrote it (git blame for its line, then back through the commits that edited the line but left the
reference as it was), takes the referenced file as it was in that commit, and follows the referenced lines to the
working tree (difflib on the two versions). A reference whose lines are still there, unchanged, but at other numbers
is stale: the script prints it and exits 1. `--fix` rewrites those references in place, to the numbers the lines
have now.

A reference whose lines moved and were also edited fails too, but only a person can say where it points now: the
script prints its guess (the offset most of its unchanged lines moved by) and leaves it. What it cannot judge it
reports without failing: lines edited in place (the prose may need reading again), and files it cannot find. A bare
file name (`forward.cu:363`) is the one tracked file whose path ends with it, or, when several do, the one in the
folder the doc is about (docs/v3.md: v3/). In a shallow clone (no history) every line looks freshly written and the
check passes without judging anything; it says so. Bare references in table rows are left to
scripts/check_doc_lines.py, which checks the docs' paper-line tables (their cells name no file; the column does).

Usage: python3 scripts/check_doc_refs.py [--fix] [DOC ...]     (default: README.md and docs/*.md)
"""
import difflib
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `path:N[-M]`, or a bare `:N[-M]` in backticks, which means the file the paragraph named last
REF = re.compile(r"(?<![\w/.-])(?P<name>[\w./-]+\.(?:cu|cuh|h|cpp|py|sh)):(?P<a>\d+)(?:-(?P<b>\d+))?(?!\d)"
                 r"|(?<=`):(?P<bare_a>\d+)(?:-(?P<bare_b>\d+))?(?=`)")
UNCOMMITTED = "0" * 40


def git(*args):
    return subprocess.run(["git", "-C", ROOT] + list(args), capture_output=True, text=True)


def blame(doc, rev=None, line=None):
    """(commit, line number in that commit's version) of the commit that last wrote each line of doc (UNCOMMITTED for
    edits not committed), or of one line of doc as it is in rev."""
    args = ["blame", "--porcelain"] + (["-L", f"{line},{line}", rev] if rev else []) + ["--", doc]
    out = git(*args).stdout.splitlines()
    found, i = [], 0
    while i < len(out):
        head = out[i].split()
        if len(head) >= 3 and re.fullmatch(r"[0-9a-f]{40}", head[0]):
            found.append((head[0], int(head[1])))
            while i < len(out) and not out[i].startswith("\t"):  # header lines up to the content line
                i += 1
        i += 1
    return found


_matches = {}


def line_before(doc, commit, parent, line):
    """The line of doc in parent that commit rewrote into its line `line`, or None (a new line, or a block rewritten
    into another number of lines)."""
    key = (doc, commit, parent)
    if key not in _matches:
        old, new = lines_at(parent, doc), lines_at(commit, doc)
        _matches[key] = [] if old is None else difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in _matches[key]:
        if j1 <= line - 1 < j2:
            return i1 + (line - 1 - j1) + 1 if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1) else None
    return None


def written_in(doc, commit, line, index, token):
    """The commit that wrote the index-th reference of a doc line, `token`: the commit that last changed the line
    (line: its number there), or, when the line as it was before that commit had the same reference in the same
    place, the commit that wrote that one, and so on back. An edit elsewhere in a line (another reference fixed,
    a word changed) does not make its old references new."""
    while commit != UNCOMMITTED:
        parent = git("rev-parse", "--verify", "-q", commit + "^").stdout.strip()
        before = line_before(doc, commit, parent, line) if parent else None
        if before is None:
            return commit
        old = [m.group(0) for m in REF.finditer(lines_at(parent, doc)[before - 1])]
        if index >= len(old) or old[index] != token:
            return commit
        commit, line = blame(doc, parent, before)[0]
    return commit


_versions = {}


def lines_at(commit, path):
    """path's lines in commit (the working tree for UNCOMMITTED), or None where it did not exist."""
    key = (commit, path)
    if key not in _versions:
        if commit == UNCOMMITTED:
            full = os.path.join(ROOT, path)
            _versions[key] = open(full).read().splitlines() if os.path.exists(full) else None
        else:
            r = git("show", f"{commit}:{path}")
            _versions[key] = r.stdout.splitlines() if r.returncode == 0 else None
    return _versions[key]


_maps = {}


def line_map(commit, path):
    """{old line: new line} for the lines of path in commit that are unchanged in the working tree."""
    key = (commit, path)
    if key not in _maps:
        old, new = lines_at(commit, path), lines_at(UNCOMMITTED, path)
        m = {}
        for tag, i1, i2, j1, _ in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
            if tag == "equal":
                for k in range(i1, i2):
                    m[k + 1] = j1 + (k - i1) + 1
        _maps[key] = m
    return _maps[key]


def resolve(name, doc, tracked):
    """The tracked file a reference names, or None."""
    if name in tracked:
        return name
    found = [t for t in tracked if t.endswith("/" + name)]
    if len(found) > 1:  # the doc's own folder: docs/v3.md is about v3/
        topic = os.path.splitext(os.path.basename(doc))[0] + "/"
        found = [t for t in found if t.startswith(topic)]
    return found[0] if len(found) == 1 else None


def main():
    fix = "--fix" in sys.argv[1:]
    docs = [a for a in sys.argv[1:] if a != "--fix"] or ["README.md"] + sorted(glob.glob("docs/*.md", root_dir=ROOT))
    tracked = set(git("ls-files").stdout.split())
    shallow = git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    stale, by_hand, changed, unknown, checked = [], [], [], [], 0
    for doc in docs:
        text = open(os.path.join(ROOT, doc)).read().splitlines()
        blamed = blame(doc)
        last = None  # the file the paragraph named last: what a bare `:N` means
        for n, line in enumerate(text, 1):
            if not line.strip() or line.startswith("|"):
                last = None  # a new paragraph, or a table row (whose bare cells check_doc_lines.py reads)
            index = -1  # of the reference on this line

            def follow(m):
                nonlocal checked, last, index
                index += 1
                bare = m.group("name") is None
                if bare and last is None:
                    return m.group(0)
                name = last if bare else m.group("name")
                last = name
                a = int(m.group("bare_a" if bare else "a"))
                b = int(m.group("bare_b" if bare else "b") or a)
                ranged = m.group("bare_b" if bare else "b") is not None
                path = resolve(name, doc, tracked)
                commit = UNCOMMITTED
                if n - 1 < len(blamed):
                    commit = written_in(doc, blamed[n - 1][0], blamed[n - 1][1], index, m.group(0))
                where = f"{doc}:{n}: {m.group(0)}" + (f" (of {name})" if bare else "")
                if path is None or lines_at(commit, path) is None:
                    unknown.append(where + (" (no such tracked file)" if path is None else f" ({path} not in {commit[:7]})"))
                    return m.group(0)
                checked += 1
                if commit == UNCOMMITTED:
                    return m.group(0)  # written against the working tree
                mapped = line_map(commit, path)
                kept = [(k, mapped[k]) for k in range(a, b + 1) if k in mapped]
                if not kept:
                    changed.append(where + f" (every line rewritten since {commit[:7]}: read it again)")
                    return m.group(0)
                # the offset most kept lines moved by (a lone `}` that difflib pairs with another `}` further down
                # must not stretch the range)
                offsets = [v - k for k, v in kept]
                shift = max(set(offsets), key=offsets.count)
                edited = len(kept) < b - a + 1
                if shift == 0 and len(set(offsets)) == 1:
                    return m.group(0)
                if shift == 0:
                    if edited:
                        changed.append(where + f" (lines edited since {commit[:7]})")
                    return m.group(0)
                na, nb = a + shift, b + shift
                # every line kept, a few lines inserted between them: the range grows to hold them; more than a few,
                # and it is likelier that difflib paired a `}` far away: a person decides
                uneven = not edited and len(set(offsets)) > 1
                if uneven and 0 < (mapped[b] - mapped[a]) - (b - a) <= 3:
                    na, nb, uneven = mapped[a], mapped[b], False
                ref = ("" if bare else name) + f":{na}" + (f"-{nb}" if ranged else "")
                if edited or uneven:  # moved and edited: a person decides where it points now
                    why = "lines edited since" if edited else "its lines moved apart"
                    by_hand.append(where + f" -> {ref}? (written in {commit[:7]}; {why})")
                    return m.group(0)
                stale.append(where + f" -> {ref} (written in {commit[:7]})")
                return ref
            text[n - 1] = REF.sub(follow, line)
        if fix:
            with open(os.path.join(ROOT, doc), "w") as f:
                f.write("\n".join(text) + "\n")
    for s in stale:
        print(("fixed: " if fix else "stale: ") + s)
    for h in by_hand:
        print("stale, fix by hand: " + h)
    for c in changed:
        print("note:  " + c)
    for u in unknown:
        print("note:  " + u)
    if shallow:
        print("check_doc_refs: a shallow clone has no history to follow the lines through: nothing judged")
        return 0
    if by_hand or (stale and not fix):
        print(f"check_doc_refs: {len(by_hand) + (0 if fix else len(stale))} stale references of {checked}"
              + ("" if fix else " (python3 scripts/check_doc_refs.py --fix rewrites those whose lines are unchanged)"))
        return 1
    print(f"check_doc_refs: {checked} references point at their lines" + (f" ({len(stale)} fixed)" if fix else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
