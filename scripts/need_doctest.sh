#!/usr/bin/env bash
# need_doctest.sh: make sure doctest's header is installed before the tests build (used by `make test` and CI).
# Installs Debian's doctest-dev where that is possible without a prompt; otherwise says exactly what to run.
set -u
has_doctest() { echo '#include <doctest/doctest.h>' | ${CXX:-c++} -x c++ -fsyntax-only - 2>/dev/null; }
has_doctest && exit 0
if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo -n"  # -n: never prompt; fails instead when a password would be needed
    echo "doctest is missing: installing doctest-dev with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if $sudo apt-get install -y -qq doctest-dev </dev/null >/dev/null 2>&1 ||
       { $sudo apt-get update -qq </dev/null >/dev/null 2>&1 && $sudo apt-get install -y -qq doctest-dev </dev/null >/dev/null 2>&1; }; then
        has_doctest && exit 0
    fi
fi
echo "error: the tests need doctest (a header-only C++ test library), which is not installed and could not be" \
     "installed here. Install it with 'sudo apt-get install doctest-dev' (Debian, Ubuntu), 'brew install doctest'" \
     "(macOS), or 'conda install -c conda-forge doctest', then run make test again." >&2
exit 1
