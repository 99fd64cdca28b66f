// online_softmax/main.cu: the program bin/online_softmax. Build and run it alone:
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o online_softmax_attention online_softmax/{main,attention,softmax,model}.cu naive/{naive,matmul,softmax,model}.cu tests/harness/*.cu && ./online_softmax_attention --check --bench
#include <cstdio>
#include <cstdlib>

#include "naive/naive.h"
#include "online_softmax/online_softmax.h"

int main(int argc, char** argv) {
    Stage s{};
    s.name = "online_softmax";
    s.below_name = "naive";
    s.unsupported = online_softmax_unsupported;
    s.workspace_bytes = online_softmax_workspace_bytes;
    s.forward = online_softmax_forward;
    s.cpu_forward = online_softmax_model_forward;
    s.cpu_model_score_matrices = 1;  // S for one head at a time
    s.describe = [](const Problem& p) {
        std::printf("  the score matrix S (B*H*Nq*Nk fp32) takes %.1f MiB of device memory\n",
                    online_softmax_workspace_bytes(p) / 1048576.0);
        std::string why;
        if (!device_memory_fits(online_softmax_workspace_bytes(p), &why)) {
            std::fprintf(stderr, "error: online_softmax: the score matrix S %s\n", why.c_str());
            std::exit(3);
        }
    };
    s.below_unsupported = naive_unsupported;
    s.below_workspace_bytes = naive_workspace_bytes;
    s.below_forward = naive_forward;
    return stage_main(argc, argv, s);
}
