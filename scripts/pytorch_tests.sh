#!/usr/bin/env bash
# pytorch_tests.sh: the optional PyTorch bridge's tests (pytorch/tests), part of `make test`. They need pytest,
# PyTorch and a CUDA GPU of sm_80 or newer; where one is missing they are not run (or skipped) and the reason is printed.
# REQUIRE_GPU=1 (as for bin/tests) turns a skip into a failure when PyTorch sees a GPU.
set -u
cd "$(dirname "$0")/.."
if ! python3 -c "import pytest" 2>/dev/null; then
    echo "pytorch tests: not run (pytest is not installed: pip install pytest torch)"
    exit 0
fi
# Without PyTorch pytest would only collect one skipped module; say why in one line instead, so that the only test
# summaries in the log are those of suites that ran tests.
if ! python3 -c "import torch" 2>/dev/null; then
    echo "pytorch tests: not run (PyTorch is not installed; the bridge is optional)"
    exit 0
fi
out=$(python3 -m pytest -q -rs pytorch/tests 2>&1)
rc=$?
echo "$out"
[ $rc = 5 ] && rc=0  # pytest's "no tests collected": the module skipped itself (no PyTorch or no GPU), said above
if [ "${REQUIRE_GPU:-0}" = 1 ] && python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null &&
   echo "$out" | grep -q "skipped"; then
    echo "pytorch tests: FAIL (REQUIRE_GPU=1 and a GPU is present, but tests were skipped)"
    exit 1
fi
exit $rc
