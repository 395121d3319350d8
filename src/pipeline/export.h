// export_hf(): a compressed model as an ordinary Hugging Face directory (config.json and
// model.safetensors, de-palettized, plus its tokenizer file) for transformers, llama.cpp's
// converter and lm-evaluation-harness.
#pragma once

#include <ATen/core/ScalarType.h>

#include <string>

namespace edkm {

// Reads `file` (verifying it), writes `out_dir` in `dtype`; returns the tokenizer file's name
// ("" when the model carries none).
std::string export_hf(const std::string& file, const std::string& out_dir, at::ScalarType dtype);

}  // namespace edkm
