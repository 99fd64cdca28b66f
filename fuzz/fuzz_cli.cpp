// fuzz_cli.cpp: libFuzzer target for the command-line parser (tests/harness/cli.cu). The input is split at NUL
// bytes into argv; parse_options must accept it or refuse it with a one-line message, never crash; an accepted
// problem must satisfy the parser's own bounds.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
    std::vector<std::string> args = {"prog"};
    std::string cur;
    for (size_t i = 0; i < size && args.size() < 64; ++i) {
        if (bytes[i] == 0) {
            args.push_back(cur);
            cur.clear();
        } else {
            cur += char(bytes[i]);
        }
    }
    args.push_back(cur);
    std::vector<const char*> argv;
    for (const std::string& a : args) argv.push_back(a.c_str());
    for (int stage = 0; stage < 2; ++stage) {  // an early rung (no --dtype, --backward) and the v2 rung
        Options o;
        std::string err;
        const bool ok = parse_options(int(argv.size()), argv.data(), stage == 1, stage == 1, &o, &err);
        if (!ok && (err.empty() || err.find('\n') != std::string::npos)) std::abort();  // one line, always
        if (ok && (o.p.B < 1 || o.p.H < 1 || o.p.Nq < 1 || o.p.Nk < 1 || o.p.d < 1 || o.reps < 1 ||
                   double(o.p.B) * o.p.H * o.p.Nq * o.p.d > 2147483647.0 ||
                   double(o.p.B) * o.p.H * o.p.Nk * o.p.d > 2147483647.0))
            std::abort();
    }
    return 0;
}
