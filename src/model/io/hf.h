// Hugging Face model directories: config.json, model.safetensors (or a sharded
// model.safetensors.index.json), and a tokenizer (tokenizer.json with tokenizer_config.json,
// tokenizer.model, or llama2.c tokenizer.bin).
#pragma once

#include <string>

#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm {

Llama load_hf_dir(const std::string& dir);

// Writes config.json and model.safetensors (weights cast to `dtype`), and the tokenizer file
// if one is given (a tokenizer.json with a tokenizer_config.json naming its EOS, as
// transformers' AutoTokenizer reads it). Each file is written atomically; the directory is created if needed.
void save_hf_dir(const Llama& model, const std::string& dir, at::ScalarType dtype,
                 const Tokenizer* tokenizer = nullptr);

}  // namespace edkm
