// npy.cu: NumPy's .npy format, version 1.0 and 2.0, float32 little-endian C order (int32 for a packed batch's
// cu_seqlens), so any stage's inputs and outputs can be exchanged with NumPy or PyTorch (np.load / np.save).
#include <cstring>
#include <fstream>
#include <regex>
#include <sys/stat.h>

#include "harness.h"

// The header is untrusted input: every size is checked against the file's length before anything is allocated,
// and only a regular file is opened (a FIFO or a device named q.npy would block or never end).
// T is float (descr '<f4', "float32") or int32_t ('<i4', "int32"): 4-byte little-endian values either way.
template <typename T>
bool npy_read_as(const std::string& path, const char* descr, const char* type_name, std::vector<T>* data,
                 std::vector<size_t>* shape, std::string* err) {
    static_assert(sizeof(T) == 4, "4-byte values");
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return *err = path + ": cannot open", false;
    if (!S_ISREG(st.st_mode)) return *err = path + ": not a regular file", false;
    const size_t file_bytes = size_t(st.st_size);
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
    const size_t data_offset = (major == 1 ? 10 : 12) + header_len;
    if (header_len > (1u << 20) || data_offset > file_bytes) return *err = path + ": truncated header", false;
    std::string header(header_len, '\0');
    if (!f.read(header.data(), header_len)) return *err = path + ": truncated header", false;
    std::smatch m;
    if (!std::regex_search(header, m, std::regex("'descr'\\s*:\\s*'([^']*)'")))
        return *err = path + ": header has no dtype", false;
    if (m[1] != descr)
        return *err = path + ": dtype is " + std::string(m[1]) + ", expected " + type_name + " ('" + descr + "')", false;
    if (!std::regex_search(header, m, std::regex("'fortran_order'\\s*:\\s*(True|False)")) || m[1] != "False")
        return *err = path + ": must be C order (fortran_order False)", false;
    if (!std::regex_search(header, m, std::regex("'shape'\\s*:\\s*\\(([^)]*)\\)")))
        return *err = path + ": header has no shape", false;
    // The shape: whole non-negative numbers separated by commas, e.g. "(2, 3)", "(4,)" or "()".
    shape->clear();
    const size_t available = (file_bytes - data_offset) / 4;  // values the file holds
    size_t count = 1;
    const std::string dims = m[1];
    size_t pos = 0;
    while (pos < dims.size()) {
        size_t comma = dims.find(',', pos);
        if (comma == std::string::npos) comma = dims.size();
        std::string item = dims.substr(pos, comma - pos);
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        pos = comma + 1;
        if (item.empty() && comma == dims.size() && !shape->empty()) break;  // the trailing comma of "(4,)"
        if (item.empty() || item.size() > 18 || item.find_first_not_of("0123456789") != std::string::npos)
            return *err = path + ": shape entry '" + item + "' is not a whole non-negative number", false;
        const size_t dim = std::stoull(item);  // at most 18 digits: cannot overflow
        shape->push_back(dim);
        // Checked before multiplying, so the product never overflows: a shape larger than the file is refused.
        if (dim != 0 && count > available / dim)
            return *err = path + ": truncated data (the shape needs more " + type_name + " values than the file's " +
                          std::to_string(available) + ")", false;
        count *= dim;
    }
    if (count != available)
        return *err = path + ": the shape holds " + std::to_string(count) + " " + type_name + " values but the file " +
                      (count < available ? "has more data after them" : "is truncated") + " (" +
                      std::to_string(available) + " values)", false;
    data->resize(count);
    if (!f.read(reinterpret_cast<char*>(data->data()), count * 4))
        return *err = path + ": truncated data (expected " + std::to_string(count) + " " + type_name + " values)", false;
    return true;
}

bool npy_read(const std::string& path, std::vector<float>* data, std::vector<size_t>* shape, std::string* err) {
    return npy_read_as(path, "<f4", "float32", data, shape, err);
}

bool npy_read_int32(const std::string& path, std::vector<int32_t>* data, std::vector<size_t>* shape,
                    std::string* err) {
    return npy_read_as(path, "<i4", "int32", data, shape, err);
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
