#include "pipeline/load.h"

#include <filesystem>
#include <fstream>

#include "common/error.h"
#include "common/finite.h"
#include "format/format.h"
#include "runtime/lut_kernel.h"
#include "model/io/gguf.h"
#include "model/io/hf.h"
#include "model/io/llama2c.h"

namespace fs = std::filesystem;

namespace edkm {
namespace {

// Every token id must have an embedding row. The embedding may have more rows than the tokenizer
// has tokens: Qwen pads 151,669 tokens to 151,936 rows, and rows beyond are never produced.
void check_vocabulary(const Tokenizer& t, const LlamaConfig& c, const std::string& model) {
  if (t.vocab_size() > c.vocab_size)
    throw_input("{}: tokenizer has {} tokens but the model {} embeds only {}", t.name(), t.vocab_size(), model,
                c.vocab_size);
}

bool is_gguf_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char head[4] = {};
  f.read(head, 4);
  return f.gcount() == 4 && gguf::is_gguf({head, 4});
}

}  // namespace

LoadedModel load_model(const std::string& path, const std::string& tokenizer, bool require_tokenizer) {
  if (!fs::exists(path)) throw_input("{}: no such file or directory", path);
  const bool dir = fs::is_directory(path);
  if (!dir && is_compressed_file(path)) {
    CompressedModel c = read_compressed(path);
    LoadedModel out{packed_llama(c), nullptr};
    out.tokenizer = tokenizer.empty() ? c.tokenizer() : load_tokenizer(tokenizer, static_cast<int>(c.config.vocab_size));
    if (!out.tokenizer && require_tokenizer) throw_input("{}: carries no tokenizer; pass --tokenizer", path);
    if (out.tokenizer) check_vocabulary(*out.tokenizer, c.config, path);
    return out;
  }
  std::unique_ptr<Tokenizer> embedded;  // a GGUF file's own
  Llama model = [&] {
    if (dir) return load_hf_dir(path);
    if (!is_gguf_file(path)) return load_llama2c(path);
    gguf::Model g = gguf::load(path);
    embedded = std::move(g.tokenizer);
    return std::move(g.model);
  }();
  for (const auto& [name, t] : model.weights()) check_finite(t, fmt::format("{}: tensor '{}'", path, name));
  const int vocab = static_cast<int>(model.config().vocab_size);
  std::string tok = tokenizer;
  if (tok.empty() && embedded) {
    check_vocabulary(*embedded, model.config(), path);
    return {std::move(model), std::move(embedded)};
  }
  if (tok.empty()) {
    const fs::path base = dir ? fs::path(path) : fs::path(path).parent_path();
    std::vector<std::string> names = {"tokenizer.json", "tokenizer.model", "tokenizer.bin"};
    if (!dir) names = {"tokenizer.bin", "tok" + std::to_string(vocab) + ".bin", "tokenizer.model"};
    for (const auto& n : names)
      if (fs::exists(base / n)) {
        tok = (base / n).string();
        break;
      }
  }
  LoadedModel out{std::move(model), nullptr};
  if (!tok.empty()) {
    out.tokenizer = load_tokenizer(tok, vocab);
    check_vocabulary(*out.tokenizer, out.model.config(), path);
  } else if (require_tokenizer) {
    throw_input("{}: no tokenizer found (looked for {}tokenizer.model / tokenizer.bin{}); pass --tokenizer", path,
                dir ? "tokenizer.json / " : "",
                dir ? "" : fmt::format(" / tok{}.bin beside it", vocab));
  }
  return out;
}

}  // namespace edkm
