// check_cpu_main.cu: bin/check_cpu NAME runs the checks of an exercise done in a CPU model (make check EX=NAME).
#include "exercises/checks.h"

int main(int argc, char** argv) { return exercise_main(argc, argv, cpu_exercises(), false); }
