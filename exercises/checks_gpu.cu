// placeholder
#include "exercises/checks.h"
const std::vector<Exercise>& gpu_exercises() { static const std::vector<Exercise> all; return all; }
