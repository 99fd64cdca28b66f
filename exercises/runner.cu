// runner.cu: the command line of bin/check_cpu and bin/check_gpu (exercise_main in checks.h).
#include <cstdio>
#include <cstring>
#include <exception>

#include "exercises/checks.h"
#include "harness.h"

namespace {

// The detail of a failed check, indented under its line.
void print_indented(const std::string& text) {
    size_t start = 0;
    while (start <= text.size()) {
        const size_t end = text.find('\n', start);
        std::printf("      %s\n", text.substr(start, end - start).c_str());
        if (end == std::string::npos) break;
        start = end + 1;
    }
}

}  // namespace

int exercise_main(int argc, char** argv, const std::vector<Exercise>& exercises, bool needs_gpu) {
    if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
        for (const Exercise& e : exercises) {
            std::printf("%s:", e.name);
            for (const ExerciseCheck& c : e.checks) std::printf(" %s", c.name);
            std::printf("\n");
        }
        return 0;
    }
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s NAME | --list   (the checks of one exercise; make check EX=NAME)\n", argv[0]);
        return 2;
    }
    const Exercise* found = nullptr;
    for (const Exercise& e : exercises)
        if (argv[1] == std::string(e.name)) found = &e;
    if (!found) {
        std::fprintf(stderr, "error: no exercise '%s' here (%s --list names them)\n", argv[1], argv[0]);
        return 2;
    }
    if (needs_gpu && (!gpu_available() || gpu_compute_capability() < 80)) {
        std::printf("SKIP %s: needs an NVIDIA GPU of compute capability 8.0 or newer (sm_80+), %s\n", found->name,
                    gpu_available() ? ("this one is sm_" + std::to_string(gpu_compute_capability())).c_str() : "none found");
        return 4;
    }
    int failed = 0;
    for (const ExerciseCheck& c : found->checks) {
        CheckResult r{false, ""};
        try {
            r = c.run();
        } catch (const std::exception& e) {
            r = {false, std::string("threw: ") + e.what()};
        }
        std::printf("%s %s/%s: %s\n", r.ok ? "PASS" : "FAIL", found->name, c.name,
                    r.ok ? r.detail.c_str() : "");
        if (!r.ok) {
            print_indented(r.detail);
            std::printf("    hint: %s\n", c.hint);
            ++failed;
        }
        std::fflush(stdout);
    }
    std::printf("%s: %d of %zu checks passed\n", found->name, int(found->checks.size()) - failed, found->checks.size());
    return failed == 0 ? 0 : 1;
}
