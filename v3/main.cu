// v3/main.cu: the program bin/v3, FlashAttention-3 on Hopper (fp16/bf16, --kernel K for the steps). On a GPU that
// is not Hopper, or with none, it says so in one line and runs the CPU model. Build with make (v3/ is compiled for
// sm_90a whatever ARCH is; the driver's tensor-map encoder is found at run time, libcuda is not linked).
#include "v3/v3.h"

int main(int argc, char** argv) { return stage_main(argc, argv, v3_stage()); }
