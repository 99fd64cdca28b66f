// test_support.h: what the doctest suites share: the shape matrix, running a stage's kernels
// on host tensors, and checks that fail with the harness's full mismatch report.
#pragma once
#include <string>
#include <vector>

#include "harness.h"

struct Case {
    Problem p;
    Dist dist;
    std::string name() const;  // e.g. "B=1 H=2 Nq=17 Nk=113 d=64 causal large"
};
// The shared shape matrix: N in {1, 17, 113, 1000}, d in {16, 40, 64, 128}, causal on and off, Nq != Nk both
// ways, and the large-logit, outlier and constant inputs.
std::vector<Case> shape_matrix();

// GPU tests are the test cases whose name starts with "GPU ": with no GPU, test_main.cu filters them out, so
// doctest counts them as skipped, and lists them by name at the end (REQUIRE_GPU=1 turns a skip into a failure).

// CHECKs O and LSE against the float64 reference (fp32 tolerance, or the same-precision rule for fp16/bf16).
void check_against_reference(const std::string& label, const Problem& p, const HostTensors& in, const Outputs& got);
// CHECKs O and LSE against another fp32 implementation's outputs on the same inputs (the stage below, a CPU
// model), with the same tolerance rules as against float64.
void check_against(const std::string& label, const Problem& p, const HostTensors& in, const Outputs& got,
                   const Outputs& want);
// CHECKs dQ, dK, dV against the float64 reference backward.
void check_grads_against_reference(const std::string& label, const Problem& p, const HostTensors& in, const HostGrads& got);
// CHECKs the float64 reference backward against central finite differences of the reference forward (loss
// sum(O * dO), so dL/dX is what the backward computes), every element of dQ, dK, dV (and dbias with a bias). For
// tiny problems.
void check_reference_backward_by_finite_differences(const std::string& label, const Problem& p, const HostTensors& in);
