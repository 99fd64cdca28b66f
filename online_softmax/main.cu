// online_softmax/main.cu: the program bin/online_softmax. Build and run it alone:
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o online_softmax_attention online_softmax/{main,stage,attention,softmax,model}.cu naive/{stage,naive,matmul,softmax,model}.cu tests/harness/*.cu && ./online_softmax_attention --check --bench
#include "online_softmax/online_softmax.h"

int main(int argc, char** argv) { return stage_main(argc, argv, online_softmax_stage()); }
