// online_softmax/stage.cu: the online_softmax stage as the shared harness sees it: its name, kernels, CPU model and the stage
// below that --check compares against. bin/online_softmax (main.cu) runs it; the stage above points at it.
#include <cstdio>

#include "naive/naive.h"
#include "online_softmax/online_softmax.h"

const Stage& online_softmax_stage() {
    static const Stage stage = [] {
        Stage s;
        s.name = "online_softmax";
        s.unsupported = online_softmax_unsupported;
        s.workspace_bytes = online_softmax_workspace_bytes;
        s.forward = online_softmax_forward;
        s.cpu_forward = online_softmax_model_forward;
        s.cpu_model_score_matrices = 1;  // S for one head at a time
        s.describe = [](const Problem& p) -> std::string {
            std::printf("  the score matrix S (B*H*Nq*Nk fp32) takes %.1f MiB of device memory\n",
                        online_softmax_workspace_bytes(p) / 1048576.0);
            std::string why;
            return device_memory_fits(online_softmax_workspace_bytes(p), &why) ? "" : "the score matrix S " + why;
        };
        s.below = &naive_stage();
        return s;
    }();
    return stage;
}
