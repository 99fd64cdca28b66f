// v1/main.cu: the program bin/v1, FlashAttention-1, checked against the online_softmax stage. Build and run it alone:
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o v1_attention v1/*.cu $(ls online_softmax/*.cu naive/*.cu | grep -v main) tests/harness/*.cu && ./v1_attention --check --bench
#include <cstdio>

#include "online_softmax/online_softmax.h"
#include "v1.h"

int main(int argc, char** argv) {
    Stage s{};
    s.name = "v1";
    s.below_name = "online_softmax";
    s.unsupported = v1_unsupported;
    s.workspace_bytes = v1_workspace_bytes;
    s.forward = v1_forward;
    s.cpu_forward = [](const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse,
                       ModelTraffic* t) {
        const V1Tiles tiles = v1_tiles(p);
        v1_model_forward(p, in, tiles.Br, tiles.Bc, o, lse, t);
    };
    s.describe = [](const Problem& p) {
        const V1Tiles t = v1_tiles(p);
        std::printf("  on-chip budget: M = %d floats (%.1f KB)", t.M, t.M * 4 / 1024.0);
        if (t.M < t.M_available)
            std::printf(", lowered from the device's %d floats so that S_ij and the row statistics fit as well", t.M_available);
        std::printf("\n  blocks: Bc = ceil(M / 4d) = %d, Br = min(Bc, d) = %d, so Tr = %d, Tc = %d; %zu bytes of shared memory per block\n",
                    t.Bc, t.Br, (p.Nq + t.Br - 1) / t.Br, (p.Nk + t.Bc - 1) / t.Bc, t.smem_bytes);
        std::printf("  device memory: Q, K, V, O, LSE and l, m only, O(N d); no Nq x Nk matrix (naive's S would take %.1f MiB)\n",
                    double(p.B) * p.H * p.Nq * p.Nk * 4 / 1048576.0);
    };
    s.below_unsupported = online_softmax_unsupported;
    s.below_workspace_bytes = online_softmax_workspace_bytes;
    s.below_forward = online_softmax_forward;
    return stage_main(argc, argv, s);
}
