// varlen.cu: packed batches (--seqlens). A packed batch is B independent sequences of their own lengths, tokens
// laid out [T, H, d] with nothing padded; the float64 reference and the CPU runs treat each sequence as a problem
// of its own (B = 1, the padded layout, its own lengths) and put its outputs back in the packed tensors. A GPU
// kernel instead maps each thread block to its sequence and tile (cu_seqlens); the results must be the same.
#include <algorithm>

#include "harness.h"

namespace {

size_t first_token(const std::vector<int>& lengths, int s) {
    size_t t = 0;
    for (int i = 0; i < s; ++i) t += lengths[i];
    return t;
}

// Rows [token0, token0 + n) of a packed [T, heads, width] tensor as a [1, heads, n, width] one.
std::vector<float> take_rows(const std::vector<float>& packed, int heads, int width, size_t token0, int n) {
    std::vector<float> part(size_t(heads) * n * width);
    for (int h = 0; h < heads; ++h)
        for (int i = 0; i < n; ++i)
            std::copy_n(&packed[((token0 + i) * heads + h) * width], width, &part[(size_t(h) * n + i) * width]);
    return part;
}

}  // namespace

Problem sequence_problem(const Problem& p, int s) {
    Problem one = p;
    one.seqlens_q.clear(), one.seqlens_k.clear();
    one.B = 1, one.Nq = p.seqlens_q[s], one.Nk = p.seqlens_k[s];
    one.head_offset = p.head_offset + s * p.H;  // the dropout mask of sequence s's heads, as batch entry s
    one.alibi_H = p.alibi_heads();
    return one;
}

HostTensors sequence_inputs(const Problem& p, const HostTensors& in, int s) {
    const size_t q0 = first_token(p.seqlens_q, s), k0 = first_token(p.seqlens_k, s);
    const int nq = p.seqlens_q[s], nk = p.seqlens_k[s];
    HostTensors one{take_rows(in.q, p.H, p.d, q0, nq), take_rows(in.k, p.kv_heads(), p.d, k0, nk),
                    take_rows(in.v, p.kv_heads(), p.d, k0, nk), {}, {}};
    if (!in.dO.empty()) one.dO = take_rows(in.dO, p.H, p.d, q0, nq);
    return one;
}

void sequence_outputs(const Problem& p, const std::vector<float>& O, const std::vector<float>& LSE, int s,
                      std::vector<float>* o, std::vector<float>* lse) {
    const size_t q0 = first_token(p.seqlens_q, s), T_all = p.tokens_q();
    const int n = p.seqlens_q[s];
    *o = take_rows(O, p.H, p.d, q0, n);
    lse->resize(size_t(p.H) * n);
    for (int h = 0; h < p.H; ++h) std::copy_n(&LSE[size_t(h) * T_all + q0], n, &(*lse)[size_t(h) * n]);
}

template <class T>
void put_sequence_rows(const Problem& p, int s, bool keys, int heads, const std::vector<T>& part, std::vector<T>* packed) {
    const std::vector<int>& lengths = keys ? p.seqlens_k : p.seqlens_q;
    const size_t token0 = first_token(lengths, s);
    const int n = lengths[s];
    for (int h = 0; h < heads; ++h)
        for (int i = 0; i < n; ++i)
            std::copy_n(&part[(size_t(h) * n + i) * p.d], p.d, &(*packed)[((token0 + i) * heads + h) * p.d]);
}

template <class T>
void put_sequence_lse(const Problem& p, int s, const std::vector<T>& part, std::vector<T>* packed) {
    const size_t token0 = first_token(p.seqlens_q, s), T_all = p.tokens_q();
    const int n = p.seqlens_q[s];
    for (int h = 0; h < p.H; ++h)
        std::copy_n(&part[size_t(h) * n], n, &(*packed)[size_t(h) * T_all + token0]);
}

template void put_sequence_rows<float>(const Problem&, int, bool, int, const std::vector<float>&, std::vector<float>*);
template void put_sequence_rows<double>(const Problem&, int, bool, int, const std::vector<double>&, std::vector<double>*);
template void put_sequence_lse<float>(const Problem&, int, const std::vector<float>&, std::vector<float>*);
template void put_sequence_lse<double>(const Problem&, int, const std::vector<double>&, std::vector<double>*);
