// check_gpu_main.cu: bin/check_gpu NAME runs the checks of an exercise done in a kernel (make check EX=NAME); it
// needs a GPU of sm_80 or newer and says so (exit code 4) without one.
#include "exercises/checks.h"

int main(int argc, char** argv) { return exercise_main(argc, argv, gpu_exercises(), true); }
