// test_exercises.cu: every exercise's checks (exercises/checks_*.cu) pass on the reference code, one test case per
// exercise, so that in a starter copy (make starter) `make test` names exactly the exercises still to do. The GPU
// exercises' test cases start with "GPU " and are skipped without a GPU, like every GPU test.
#include <doctest/doctest.h>

#include <cstring>

#include "exercises/checks.h"
#include "v2/v2.h"

namespace {

void run_exercise(const std::vector<Exercise>& all, const char* name) {
    const Exercise* e = nullptr;
    for (const Exercise& x : all)
        if (std::strcmp(x.name, name) == 0) e = &x;
    REQUIRE_MESSAGE(e != nullptr, "no exercise " << name);
    for (const ExerciseCheck& c : e->checks) {
        const CheckResult r = c.run();
        CHECK_MESSAGE(r.ok, "exercise " << std::string(name) << ", check " << std::string(c.name) << ": FAIL\n" << r.detail
                                        << "\n  hint: " << std::string(c.hint) << "\n  (make check EX=" << std::string(name) << ")");
    }
}

}  // namespace

TEST_CASE("exercise softmax-3pass-model") { run_exercise(cpu_exercises(), "softmax-3pass-model"); }
TEST_CASE("exercise online-merge") { run_exercise(cpu_exercises(), "online-merge"); }
TEST_CASE("exercise online-rows-model") { run_exercise(cpu_exercises(), "online-rows-model"); }
TEST_CASE("exercise fa1-block-sizes") { run_exercise(cpu_exercises(), "fa1-block-sizes"); }
TEST_CASE("exercise fa1-inner-loop-model") { run_exercise(cpu_exercises(), "fa1-inner-loop-model"); }
TEST_CASE("exercise fa2-deferred-norm-model") { run_exercise(cpu_exercises(), "fa2-deferred-norm-model"); }
TEST_CASE("exercise causal-skip-model") { run_exercise(cpu_exercises(), "causal-skip-model"); }
TEST_CASE("exercise window-skip-model") { run_exercise(cpu_exercises(), "window-skip-model"); }
TEST_CASE("exercise backward-ds-model") { run_exercise(cpu_exercises(), "backward-ds-model"); }
TEST_CASE("exercise deterministic-dq-model") { run_exercise(cpu_exercises(), "deterministic-dq-model"); }
TEST_CASE("exercise v3-causal-order") { run_exercise(cpu_exercises(), "v3-causal-order"); }
TEST_CASE("exercise v2-grid-order") { run_exercise(cpu_exercises(), "v2-grid-order"); }
TEST_CASE("exercise backward-swizzle") { run_exercise(cpu_exercises(), "backward-swizzle"); }
TEST_CASE("GPU exercise block-reduction") { run_exercise(gpu_exercises(), "block-reduction"); }
TEST_CASE("GPU exercise softmax-3pass-kernel") { run_exercise(gpu_exercises(), "softmax-3pass-kernel"); }
TEST_CASE("GPU exercise tiled-matmul") { run_exercise(gpu_exercises(), "tiled-matmul"); }
TEST_CASE("GPU exercise online-rows-kernel") { run_exercise(gpu_exercises(), "online-rows-kernel"); }
TEST_CASE("GPU exercise fa1-inner-loop-kernel") { run_exercise(gpu_exercises(), "fa1-inner-loop-kernel"); }
TEST_CASE("GPU exercise warp-softmax-fp32") { run_exercise(gpu_exercises(), "warp-softmax-fp32"); }
TEST_CASE("GPU exercise causal-skip-kernel") { run_exercise(gpu_exercises(), "causal-skip-kernel"); }
TEST_CASE("GPU exercise backward-ds-kernel") { run_exercise(gpu_exercises(), "backward-ds-kernel"); }

// The check "bitwise-repeatable" of deterministic-dq-model can fail: with atomics, two block orders give two dQs.
TEST_CASE("the v2 backward model's atomic dQ depends on the order of the K/V blocks; the deterministic one does not") {
    const Problem p = small_problem(70, 300, 32, false);
    const HostTensors in = make_inputs(p, Dist::normal, 8);
    std::vector<float> o, lse;
    ModelTraffic t;
    v2_model_forward(p, in, &o, &lse, &t);
    auto dq = [&](uint64_t seed, bool deterministic) {
        std::vector<float> dq, dk, dv;
        v2_model_backward_scheduled(p, in, o, lse, &dq, &dk, &dv, &t, seed, deterministic);
        return dq;
    };
    const std::vector<float> a1 = dq(1, false), a2 = dq(2, false), d1 = dq(1, true), d2 = dq(2, true);
    CHECK(std::memcmp(a1.data(), a2.data(), a1.size() * sizeof(float)) != 0);
    CHECK(std::memcmp(d1.data(), d2.data(), d1.size() * sizeof(float)) == 0);
    CHECK(a1 == dq(1, false));  // the same order, the same bits
}
