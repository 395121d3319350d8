#include "model/io/hf.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"
#include "model/io/safetensors.h"

namespace fs = std::filesystem;

namespace edkm {

Llama load_hf_dir(const std::string& dir) {
  const fs::path d(dir);
  const fs::path config_path = d / "config.json";
  if (!fs::exists(config_path)) throw_input("{}: not a model directory (no config.json)", dir);
  nlohmann::json cj;
  try {
    cj = nlohmann::json::parse(read_file(config_path.string()));
  } catch (const nlohmann::json::exception& e) {
    throw_input("{}: invalid JSON: {}", config_path.string(), e.what());
  }
  LlamaConfig cfg = LlamaConfig::from_hf(cj, config_path.string());

  std::map<std::string, at::Tensor> weights;
  const fs::path single = d / "model.safetensors", index = d / "model.safetensors.index.json";
  if (fs::exists(single)) {
    safetensors::File f(single.string());
    for (const auto& n : f.names()) weights[n] = f.tensor(n);
  } else if (fs::exists(index)) {
    nlohmann::json ij;
    try {
      ij = nlohmann::json::parse(read_file(index.string()));
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}: invalid JSON: {}", index.string(), e.what());
    }
    if (!ij.contains("weight_map") || !ij["weight_map"].is_object())
      throw_input("{}: no weight_map object", index.string());
    std::map<std::string, std::unique_ptr<safetensors::File>> files;
    for (auto it = ij["weight_map"].begin(); it != ij["weight_map"].end(); ++it) {
      if (!it.value().is_string()) throw_input("{}: weight_map entry '{}' is not a file name", index.string(), it.key());
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos)
        throw_input("{}: shard '{}' is not a file in the directory", index.string(), shard);
      auto& f = files[shard];
      if (!f) f = std::make_unique<safetensors::File>((d / shard).string());
      if (!f->contains(it.key())) throw_input("{}: has no tensor '{}' (named in {})", f->path(), it.key(), index.string());
      weights[it.key()] = f->tensor(it.key());
    }
  } else {
    throw_input("{}: no model.safetensors or model.safetensors.index.json", dir);
  }
  return Llama(cfg, std::move(weights), dir);
}

void save_hf_dir(const Llama& model, const std::string& dir, at::ScalarType dtype, const Tokenizer* tokenizer) {
  fs::create_directories(dir);
  nlohmann::json cj = model.config().to_hf();
  cj["torch_dtype"] = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : "float32";
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [name, shape] : tensor_shapes(model.config()))
    tensors.emplace_back(name, model.weight(name).to(dtype));
  safetensors::write((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_file_atomic((fs::path(dir) / "config.json").string(), cj.dump(2) + "\n");
  if (!tokenizer) return;
  write_file_atomic((fs::path(dir) / tokenizer->file_name()).string(), tokenizer->data());
  if (tokenizer->kind() == Tokenizer::Kind::kHuggingFace) {
    nlohmann::json tc = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                         {"model_max_length", model.config().max_seq_len}};
    if (!tokenizer->eos_token().empty()) tc["eos_token"] = tokenizer->eos_token();
    write_file_atomic((fs::path(dir) / "tokenizer_config.json").string(), tc.dump(2) + "\n");
  }
}

}  // namespace edkm
