// Precompiled header for the library, CLI, tests and benchmarks. Only this file names
// torch/torch.h: public module headers include the lighter ATen/core headers they need.
#pragma once
#include <torch/torch.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
