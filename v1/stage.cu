// v1/stage.cu: the v1 stage as the shared harness sees it: its name, kernels, CPU model and the stage
// below that --check compares against. bin/v1 (main.cu) runs it; the stage above points at it.
#include <cstdio>

#include "online_softmax/online_softmax.h"
#include "v1.h"

const Stage& v1_stage() {
    static const Stage stage = [] {
        Stage s;
        s.name = "v1";
        s.unsupported = v1_unsupported;
        s.workspace_bytes = v1_workspace_bytes;
        s.forward = v1_forward;
        s.cpu_forward = [](const Problem& p, const HostTensors& in, std::vector<float>* o, std::vector<float>* lse,
                           ModelTraffic* t) {
            const V1Tiles tiles = v1_tiles(p);
            v1_model_forward(p, in, tiles.Br, tiles.Bc, o, lse, t);
        };
        s.describe = [](const Problem& p) -> std::string {
            const V1Tiles t = v1_tiles(p);
            std::printf("  on-chip budget: M = %d floats (%.1f KB)", t.M, t.M * 4 / 1024.0);
            if (t.M < t.M_available)
                std::printf(", lowered from the device's %d floats so that S_ij and the row statistics fit as well", t.M_available);
            std::printf("\n  blocks: Bc = ceil(M / 4d) = %d, Br = min(Bc, d) = %d, so Tr = %d, Tc = %d; %zu bytes of shared memory per block\n",
                        t.Bc, t.Br, (p.Nq + t.Br - 1) / t.Br, (p.Nk + t.Bc - 1) / t.Bc, t.smem_bytes);
            std::printf("  device memory: Q, K, V, O, LSE and l, m only, O(N d); no Nq x Nk matrix (naive's S would take %.1f MiB)\n",
                        double(p.B) * p.H * p.Nq * p.Nk * 4 / 1048576.0);
            return "";
        };
        s.below = &online_softmax_stage();
        return s;
    }();
    return stage;
}
