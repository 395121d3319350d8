// One entry point for every model source the tools accept.
#pragma once

#include <memory>
#include <string>

#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm {

struct LoadedModel {
  Llama model;
  std::unique_ptr<Tokenizer> tokenizer;  // null when none was found and none was required
};

// path: a Hugging Face directory (config.json), a llama2.c .bin checkpoint, a GGUF file
// (dequantized to fp32; its tokenizer.ggml.* vocabulary is used unless a tokenizer is given), or
// an edkm compressed model (its projections computed from the packed indices by
// PalettizedLinear; its embedded tokenizer is used unless one is given).
// tokenizer: an explicit tokenizer file; otherwise one is looked for in the model directory
// (tokenizer.json, tokenizer.model, tokenizer.bin) or beside a .bin checkpoint (tokenizer.bin, tok<vocab>.bin,
// tokenizer.model). With require_tokenizer, not finding one is an InputError.
LoadedModel load_model(const std::string& path, const std::string& tokenizer = "",
                       bool require_tokenizer = true);

}  // namespace edkm
