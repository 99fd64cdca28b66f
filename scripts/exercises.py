#!/usr/bin/env python3
"""The course kit's tool (docs/exercises.md). Called by make:

    make exercises                    list the exercises: name, rung, CPU/GPU, difficulty, minutes, files
    make starter DIR=path [EX=a,b]    a complete copy of the project with those regions (default: all) replaced by
                                      their stubs, and without the model answers; refuses a non-empty DIR
    make check EX=name                build what the exercise needs and run its checks (exit 0: all pass,
                                      1: a check failed, 2: no such exercise, 4: needs a GPU of sm_80+ and none here)

and directly, for the CI proof (scripts/exercises_ci.sh): `plant BUG DIR` (a copy with one classic bug of
exercises/bugs.json planted in a CPU model), `names cpu|gpu` and `independent EX cpu|gpu` (the exercises whose
checks must still pass with only EX blanked: those that do not list EX in `after`, directly or through another).

An exercise is a region of the reference code between a line `// EXERCISE(name): what to write` and a line
`// END EXERCISE`; exercises/stubs/<name>.stub holds what a starter copy puts there, one block per region (regions in
path order, then line order), blocks separated by a line `// ---- next region ----`. The marker lines stay in the
copy, so a student sees where to write and `make check` still finds the exercise.
"""
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTRY = os.path.join(ROOT, "exercises", "exercises.json")
BUGS = os.path.join(ROOT, "exercises", "bugs.json")
STUBS = os.path.join(ROOT, "exercises", "stubs")
ANSWERS = "docs/exercises_answers.md"  # the model answers to the written questions: left out of starter copies
SOURCE_EXT = (".cu", ".cuh", ".h")
START = re.compile(r"^\s*// EXERCISE\(([a-z0-9-]+)\): (\S.*)$")
END = re.compile(r"^\s*// END EXERCISE\s*$")
NEXT_REGION = "// ---- next region ----"
SKIPPED_CODE = 4  # as stage programs do for a check that did not run (docs/conventions.md, exit codes)


def fail(message, code=2):
    print("error: " + message, file=sys.stderr)
    sys.exit(code)


def project_files():
    """Relative paths of the project's files: what git tracks or would track, or (in a starter copy, no .git)
    every file outside build outputs."""
    if os.path.isdir(os.path.join(ROOT, ".git")) or os.path.isfile(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return sorted(p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p)))
    files = []
    for top, dirs, names in os.walk(ROOT):
        rel = os.path.relpath(top, ROOT)
        dirs[:] = [d for d in dirs if not (rel == "." and d in ("build", "bin", ".git")) and d != "__pycache__"]
        files += [os.path.normpath(os.path.join(rel, n)) for n in names]
    return sorted(files)


def registry():
    with open(REGISTRY) as f:
        return json.load(f)["exercises"]


def regions(files):
    """{name: [(path, start line index, end line index, one-line description)]}, every marker checked."""
    found = {}
    for path in files:
        if not path.endswith(SOURCE_EXT):
            continue
        with open(os.path.join(ROOT, path)) as f:
            lines = f.read().split("\n")
        open_at = None
        for i, line in enumerate(lines):
            m = START.match(line)
            if m:
                if open_at is not None:
                    fail(f"{path}:{i + 1}: EXERCISE inside the region opened at line {open_at[0] + 1}")
                open_at = (i, m.group(1), m.group(2))
            elif END.match(line):
                if open_at is None:
                    fail(f"{path}:{i + 1}: END EXERCISE without an EXERCISE line")
                found.setdefault(open_at[1], []).append((path, open_at[0], i, open_at[2]))
                open_at = None
        if open_at is not None:
            fail(f"{path}:{open_at[0] + 1}: EXERCISE({open_at[1]}) has no END EXERCISE")
    return found


def stub_blocks(name):
    path = os.path.join(STUBS, name + ".stub")
    if not os.path.isfile(path):
        fail(f"exercise {name} has no stub: {os.path.relpath(path, ROOT)}")
    with open(path) as f:
        text = f.read()
    blocks = [b.strip("\n") for b in text.split(NEXT_REGION + "\n")]
    return [b.split("\n") for b in blocks]


def consistent(files):
    """The registry, the markers and the stubs agree; returns (exercises in registry order, regions)."""
    exercises = registry()
    found = regions(files)
    names = [e["name"] for e in exercises]
    for name in found:
        if name not in names:
            fail(f"EXERCISE({name}) in {found[name][0][0]} is not in exercises/exercises.json")
    for e in exercises:
        if e["name"] not in found:
            fail(f"exercise {e['name']} (exercises/exercises.json) has no EXERCISE({e['name']}) region in the code")
        if len(stub_blocks(e["name"])) != len(found[e["name"]]):
            fail(f"exercise {e['name']}: {len(found[e['name']])} regions but "
                 f"{len(stub_blocks(e['name']))} stub blocks in exercises/stubs/{e['name']}.stub")
    return exercises, found


def selected(exercises, ex):
    if not ex:
        return [e["name"] for e in exercises]
    names = [n.strip() for n in ex.split(",") if n.strip()]
    known = [e["name"] for e in exercises]
    for n in names:
        if n not in known:
            fail(f"no exercise '{n}' (make exercises lists them)")
    return names


def cmd_list():
    exercises, found = consistent(project_files())
    print(f"{'exercise':<26} {'rung':<15} {'runs on':<11} {'diff':<4} {'time':>6}  {'files':<26} after")
    for e in exercises:
        where = "CPU" if e["kind"] == "cpu" else "GPU sm_80+"
        files = ", ".join(sorted({r[0] for r in found[e["name"]]}))
        after = ", ".join(e["after"]) or "-"
        print(f"{e['name']:<26} {e['rung']:<15} {where:<11} {e['difficulty']:<4} {e['minutes']:>4} m  {files:<26} {after}")
    cpu = sum(e["kind"] == "cpu" for e in exercises)
    print(f"{len(exercises)} exercises, {cpu} checked on the CPU; docs/exercises.md describes each")


def write_copy(dest, files, edit):
    """Copies `files` into dest (modification times kept, so a copied build/ stays valid for untouched files);
    edit(path, lines) returns the new lines of a file to change, or None."""
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        fail(f"{dest} exists and is not an empty directory: give a new or empty DIR")
    os.makedirs(dest, exist_ok=True)
    for path in files:
        if path == ANSWERS:
            continue
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        lines = None
        if path.endswith(SOURCE_EXT):
            with open(os.path.join(ROOT, path)) as f:
                lines = edit(path, f.read().split("\n"))
        if lines is None:
            shutil.copy2(os.path.join(ROOT, path), target)
        else:
            with open(target, "w") as f:
                f.write("\n".join(lines))
            shutil.copymode(os.path.join(ROOT, path), target)


def cmd_starter(dest, ex):
    if not dest:
        fail("make starter needs DIR=path (a new or empty directory)")
    files = project_files()
    exercises, found = consistent(files)
    names = selected(exercises, ex)
    # per file: (start, end, stub lines) of the regions to blank
    edits = {}
    for name in names:
        for (path, start, end, _), block in zip(found[name], stub_blocks(name)):
            edits.setdefault(path, []).append((start, end, block))

    def blank(path, lines):
        if path not in edits:
            return None
        for start, end, block in sorted(edits[path], reverse=True):
            lines[start + 1:end] = block
        return lines

    write_copy(dest, files, blank)
    print(f"starter copy in {dest}: {len(names)} exercise(s) blanked: {', '.join(names)}")
    print(f"  cd {dest} && make check EX={names[0]}     (make exercises lists them; docs/exercises.md explains them)")


def cmd_plant(bug, dest):
    with open(BUGS) as f:
        bugs = {b["name"]: b for b in json.load(f)["bugs"]}
    if bug not in bugs:
        fail(f"no bug '{bug}' in exercises/bugs.json ({', '.join(bugs)})")
    b = bugs[bug]

    def plant(path, lines):
        if path != b["file"]:
            return None
        text = "\n".join(lines)
        for find, replace in b["edits"]:
            if text.count(find) != 1:
                fail(f"bug {bug}: the text to replace occurs {text.count(find)} times in {path}, not once: {find!r}")
            text = text.replace(find, replace)
        return text.split("\n")

    write_copy(dest, project_files(), plant)


def depends_on(exercises, name, blanked):
    """Does exercise `name` run the code of `blanked` (itself, or through its `after` list, transitively)?"""
    by_name = {e["name"]: e for e in exercises}
    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        if n == blanked:
            return True
        if n not in seen:
            seen.add(n)
            todo += by_name[n]["after"]
    return False


def cmd_independent(blanked, kind):
    """The exercises of `kind` whose checks must still pass in a copy with only `blanked` blanked."""
    exercises = registry()
    selected(exercises, blanked)
    print(" ".join(e["name"] for e in exercises if e["kind"] == kind and not depends_on(exercises, e["name"], blanked)))


def cmd_check(ex):
    if not ex:
        fail("make check needs EX=name (make exercises lists them)")
    exercises = {e["name"]: e for e in registry()}
    if ex not in exercises:
        fail(f"no exercise '{ex}' (make exercises lists them)")
    e = exercises[ex]
    binary = "bin/check_cpu" if e["kind"] == "cpu" else "bin/check_gpu"
    if e["kind"] == "gpu" and subprocess.run("nvidia-smi -L", shell=True, capture_output=True).returncode != 0:
        print(f"SKIP {ex}: needs an NVIDIA GPU of compute capability 8.0 or newer (sm_80+), none found; "
              f"the CPU exercises (make exercises) need none")
        sys.exit(SKIPPED_CODE)
    make = os.environ.get("MAKE", "make")
    print(f"building {binary} ...", flush=True)
    build = subprocess.run([make, "-s", f"-j{os.cpu_count() or 2}", binary], cwd=ROOT)
    if build.returncode != 0:
        print(f"FAIL {ex}: {binary} does not build (the compiler's errors are above)")
        sys.exit(1)
    sys.exit(subprocess.run([os.path.join(ROOT, binary), ex], cwd=ROOT).returncode)


def main(argv):
    if len(argv) >= 2 and argv[1] == "list":
        cmd_list()
    elif len(argv) == 4 and argv[1] == "starter":
        cmd_starter(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "check":
        cmd_check(argv[2])
    elif len(argv) == 4 and argv[1] == "plant":
        cmd_plant(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "independent":
        cmd_independent(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "names":
        print(" ".join(e["name"] for e in registry() if e["kind"] == argv[2]))
    elif len(argv) == 2 and argv[1] == "bugs":  # name, exercise, expected hint: one bug a line, tab-separated
        with open(BUGS) as f:
            for b in json.load(f)["bugs"]:
                print(f"{b['name']}\t{b['exercise']}\t{b['hint']}")
    else:
        fail("usage: exercises.py list | starter DIR EX | check EX | plant BUG DIR | names cpu|gpu | independent EX cpu|gpu")


if __name__ == "__main__":
    main(sys.argv)
