// checks.h: the checks of the course's exercises (docs/exercises.md, exercises/exercises.json). An exercise is a
// marked region of the reference code; its checks run that code and say PASS or FAIL, with what they measured and,
// on a failure, a hint. bin/check_cpu runs the exercises checked through the CPU models (checks_cpu.cu),
// bin/check_gpu those that need a GPU of sm_80 or newer (checks_gpu.cu); `make check EX=name` picks the binary, and
// tests/test_exercises.cu runs every check inside `make test`.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "harness.h"

struct CheckResult {
    bool ok;
    std::string detail;  // what the check measured; on a failure the comparison's report (with its own hint)
};

struct ExerciseCheck {
    const char* name;  // e.g. "one-division-per-row"
    const char* hint;  // where to look when it fails
    std::function<CheckResult()> run;
};

struct Exercise {
    const char* name;  // as in the markers, e.g. "fa2-deferred-norm-model"
    std::vector<ExerciseCheck> checks;
};

const std::vector<Exercise>& cpu_exercises();
const std::vector<Exercise>& gpu_exercises();

// What the checks share (checks_cpu.cu): problems, and checks over any forward pass, given as a function from
// (problem, inputs) to (O, LSE) on the host: a CPU model or a GPU run.
using ForwardRun = std::function<Outputs(const Problem&, const HostTensors&)>;
ForwardRun cpu_run(const CpuForward& model);
Problem small_problem(int Nq, int Nk, int d, bool causal);  // B = 1, H = 2
std::string describe(const Problem& p, Dist dist);
// O and LSE against float64 on six problems (causal, Nq != Nk both ways, large logits, outliers, N = 1); on a
// failure the first failing comparison's report, hint included.
CheckResult forward_values(const ForwardRun& run);
// Causal with Nq > Nk: the rows that see no key must be exactly O = 0, LSE = -inf.
CheckResult masked_rows(const ForwardRun& run);
// A count against its closed form, as a result.
CheckResult counted(bool ok, const std::string& what, double got, double want);

// The program behind bin/check_cpu and bin/check_gpu: `bin/check_cpu NAME` runs NAME's checks, one line each
// (PASS or FAIL, then the detail and the hint of a failure), and returns 0 when all pass, 1 when one fails, 2 for
// an unknown name, 4 when the exercise needs a GPU of sm_80 or newer and there is none (needs_gpu). `--list` prints
// the exercises and their checks.
int exercise_main(int argc, char** argv, const std::vector<Exercise>& exercises, bool needs_gpu);
