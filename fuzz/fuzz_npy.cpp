// fuzz_npy.cpp: libFuzzer target for the .npy reader (tests/harness/npy.cu). Each input is written to a file and
// read back through npy_read, which must either accept it or refuse it with a message: never crash, read out of
// bounds, allocate more than the file could hold, or accept a shape whose element count differs from the data.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unistd.h>

#include "harness.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
    static const std::string path = "/tmp/fuzz_npy_" + std::to_string(getpid()) + ".npy";
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) return 0;
    std::fwrite(bytes, 1, size, f);
    std::fclose(f);
    std::vector<float> data;
    std::vector<size_t> shape;
    std::string err;
    if (npy_read(path, &data, &shape, &err)) {
        size_t count = 1;
        for (size_t s : shape) count *= s;
        if (count != data.size() || data.size() * 4 > size) std::abort();  // accepted sizes must match the file
    } else if (err.empty()) {
        std::abort();  // a refusal always says why
    }
    return 0;
}
