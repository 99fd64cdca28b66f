// fuzz_npy.cpp: libFuzzer target for the .npy reader (tests/harness/npy.cu). Each input is written to a file and
// read back through npy_read and npy_read_int32, which must each either accept it or refuse it with a message:
// never crash, read out of bounds, allocate more than the file could hold, or accept a shape whose element count
// differs from the data.
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
    auto check = [&](bool accepted, size_t n_values, const std::vector<size_t>& shape, const std::string& err) {
        if (accepted) {
            size_t count = 1;
            for (size_t s : shape) count *= s;
            if (count != n_values || n_values * 4 > size) std::abort();  // accepted sizes must match the file
        } else if (err.empty()) {
            std::abort();  // a refusal always says why
        }
    };
    std::vector<float> data;
    std::vector<int32_t> ints;  // the int32 reader (cu_seqlens): the same header code, another dtype
    std::vector<size_t> shape, int_shape;
    std::string err, int_err;
    check(npy_read(path, &data, &shape, &err), data.size(), shape, err);
    check(npy_read_int32(path, &ints, &int_shape, &int_err), ints.size(), int_shape, int_err);
    return 0;
}
