// npy.cu: NumPy's .npy format, version 1.0 and 2.0, float32 little-endian C order only, so any stage's inputs
// and outputs can be exchanged with NumPy or PyTorch (np.load / np.save).
#include <cstring>
#include <fstream>
#include <regex>

#include "harness.h"

bool npy_read(const std::string& path, std::vector<float>* data, std::vector<size_t>* shape, std::string* err) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return *err = path + ": cannot open", false;
    char magic[8];
    if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) return *err = path + ": not a .npy file", false;
    const int major = magic[6];
    size_t header_len = 0;
    unsigned char len[4] = {0, 0, 0, 0};
    if (major == 1) {
        if (!f.read(reinterpret_cast<char*>(len), 2)) return *err = path + ": truncated header", false;
        header_len = len[0] | (len[1] << 8);
    } else if (major == 2 || major == 3) {
        if (!f.read(reinterpret_cast<char*>(len), 4)) return *err = path + ": truncated header", false;
        header_len = len[0] | (len[1] << 8) | (size_t(len[2]) << 16) | (size_t(len[3]) << 24);
    } else {
        return *err = path + ": unsupported .npy version " + std::to_string(major), false;
    }
    if (header_len > (1u << 20)) return *err = path + ": header too long", false;
    std::string header(header_len, '\0');
    if (!f.read(header.data(), header_len)) return *err = path + ": truncated header", false;
    std::smatch m;
    if (!std::regex_search(header, m, std::regex("'descr'\\s*:\\s*'([^']*)'")))
        return *err = path + ": header has no dtype", false;
    if (m[1] != "<f4") return *err = path + ": dtype is " + std::string(m[1]) + ", expected float32 ('<f4')", false;
    if (!std::regex_search(header, m, std::regex("'fortran_order'\\s*:\\s*(True|False)")) || m[1] != "False")
        return *err = path + ": must be C order (fortran_order False)", false;
    if (!std::regex_search(header, m, std::regex("'shape'\\s*:\\s*\\(([^)]*)\\)")))
        return *err = path + ": header has no shape", false;
    shape->clear();
    size_t count = 1;
    const std::string dims = m[1];
    const std::regex number("\\d+");
    for (std::sregex_iterator it(dims.begin(), dims.end(), number), end; it != end; ++it) {
        shape->push_back(std::stoull(it->str()));
        count *= shape->back();
    }
    data->resize(count);
    if (!f.read(reinterpret_cast<char*>(data->data()), count * 4))
        return *err = path + ": truncated data (expected " + std::to_string(count) + " float32 values)", false;
    return true;
}

bool npy_write(const std::string& path, const std::vector<float>& data, const std::vector<size_t>& shape,
               std::string* err) {
    std::string dims;
    for (size_t s : shape) dims += std::to_string(s) + ",";
    if (shape.size() > 1) dims.pop_back();  // (4,) for one dimension, (2, 3) for more
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
    while ((10 + header.size() + 1) % 64 != 0) header += ' ';  // total header a multiple of 64 bytes
    header += '\n';
    std::ofstream f(path, std::ios::binary);
    if (!f) return *err = path + ": cannot create", false;
    const unsigned char preamble[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(header.size() & 0xFF),
                                        (unsigned char)(header.size() >> 8)};
    f.write(reinterpret_cast<const char*>(preamble), 10);
    f.write(header.data(), header.size());
    f.write(reinterpret_cast<const char*>(data.data()), data.size() * 4);
    if (!f) return *err = path + ": write failed", false;
    return true;
}
