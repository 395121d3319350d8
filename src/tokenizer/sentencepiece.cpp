// SentencePiece through the dlopen()ed shim (tokenizer/spm_shim): see the shim for why.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "common/atomic_file.h"
#include "common/error.h"
#include "tokenizer/tokenizer.h"

namespace edkm {
namespace {

struct ShimApi {
  void* (*load)(const char*, int, char*, int);
  void (*free)(void*);
  int (*vocab_size)(void*);
  int (*bos_id)(void*);
  int (*eos_id)(void*);
  int (*encode)(void*, const char*, int, int*, int);
  int (*piece)(void*, int, char*, int);
  int (*is_byte)(void*, int);
  int (*is_control)(void*, int);
};

// The shim is looked for in $EDKM_SPM_SHIM, beside the running executable, then where the
// build put it.
std::vector<std::string> shim_candidates() {
  std::vector<std::string> c;
  if (const char* env = std::getenv("EDKM_SPM_SHIM")) c.push_back(env);
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) c.push_back((exe.parent_path() / "libedkm_spm.so").string());
  c.push_back(EDKM_SPM_SHIM_PATH);
  return c;
}

const ShimApi& shim() {
  static ShimApi api;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = nullptr;
    std::string tried;
    for (const auto& path : shim_candidates()) {
      if (!std::filesystem::exists(path)) continue;
      lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (lib) break;
      tried += fmt::format(" {} ({})", path, ::dlerror());
    }
    if (!lib) {
      error = "SentencePiece support (libedkm_spm.so) not found; set EDKM_SPM_SHIM." + tried;
      return;
    }
    auto sym = [&](const char* name) {
      void* p = ::dlsym(lib, name);
      if (!p) error = fmt::format("libedkm_spm.so lacks {}", name);
      return p;
    };
    api.load = reinterpret_cast<decltype(api.load)>(sym("edkm_spm_load"));
    api.free = reinterpret_cast<decltype(api.free)>(sym("edkm_spm_free"));
    api.vocab_size = reinterpret_cast<decltype(api.vocab_size)>(sym("edkm_spm_vocab_size"));
    api.bos_id = reinterpret_cast<decltype(api.bos_id)>(sym("edkm_spm_bos_id"));
    api.eos_id = reinterpret_cast<decltype(api.eos_id)>(sym("edkm_spm_eos_id"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("edkm_spm_encode"));
    api.piece = reinterpret_cast<decltype(api.piece)>(sym("edkm_spm_piece"));
    api.is_byte = reinterpret_cast<decltype(api.is_byte)>(sym("edkm_spm_is_byte"));
    api.is_control = reinterpret_cast<decltype(api.is_control)>(sym("edkm_spm_is_control"));
  });
  if (!error.empty()) throw std::runtime_error(error);
  return api;
}

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::string data, const std::string& name) : Tokenizer(name, std::move(data)), api_(shim()) {
    char err[512] = {0};
    handle_ = api_.load(this->data().data(), static_cast<int>(this->data().size()), err, sizeof(err));
    if (!handle_) throw_input("{}: not a SentencePiece model: {}", name, err);
    vocab_ = api_.vocab_size(handle_);
    bos_ = api_.bos_id(handle_);
    eos_ = api_.eos_id(handle_);
    // Pieces as text: "▁" (U+2581) is a space, <0xAB> byte pieces are the byte, control
    // pieces (<s>, </s>) print as nothing.
    texts_.resize(vocab_);
    for (int i = 0; i < vocab_; ++i) {
      char buf[1024];
      int n = api_.piece(handle_, i, buf, sizeof(buf));
      std::string p(buf, std::min<int>(n, sizeof(buf) - 1));
      if (api_.is_control(handle_, i)) {
        p.clear();
      } else if (api_.is_byte(handle_, i)) {
        p = std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
      } else {
        for (size_t pos; (pos = p.find("\xE2\x96\x81")) != std::string::npos;) p.replace(pos, 3, " ");
      }
      texts_[i] = std::move(p);
    }
  }
  ~SentencePieceTokenizer() override { api_.free(handle_); }

  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids(text.size() + 8);
    int n = api_.encode(handle_, text.data(), static_cast<int>(text.size()), ids.data(), static_cast<int>(ids.size()));
    if (n < 0) throw_input("{}: SentencePiece failed to encode the text", name());
    if (n > static_cast<int>(ids.size())) {
      ids.resize(n);
      api_.encode(handle_, text.data(), static_cast<int>(text.size()), ids.data(), n);
    }
    ids.resize(n);
    if (bos && bos_ >= 0) ids.insert(ids.begin(), bos_);
    if (eos && eos_ >= 0) ids.push_back(eos_);
    return ids;
  }

  std::string piece(int prev, int token) const override {
    if (token < 0 || token >= vocab_) throw_invalid("token {} out of range [0, {})", token, vocab_);
    const std::string& p = texts_[token];
    if (prev == bos_ && !p.empty() && p[0] == ' ') return p.substr(1);
    return p;
  }

  int vocab_size() const override { return vocab_; }
  int bos_id() const override { return bos_; }
  int eos_id() const override { return eos_; }
  Kind kind() const override { return Kind::kSentencePiece; }

 private:
  const ShimApi& api_;
  void* handle_ = nullptr;
  int vocab_ = 0, bos_ = 1, eos_ = 2;
  std::vector<std::string> texts_;
};

}  // namespace

std::unique_ptr<Tokenizer> sentencepiece_tokenizer(std::string data, const std::string& name) {
  return std::make_unique<SentencePieceTokenizer>(std::move(data), name);
}

namespace {

// A tokenizer.json: a JSON object (no other tokenizer file starts with '{' after whitespace).
bool is_tokenizer_json(const std::string& data) {
  const size_t first = data.find_first_not_of(" \t\r\n");
  return first != std::string::npos && data[first] == '{';
}

}  // namespace

std::unique_ptr<Tokenizer> tokenizer_from_bytes(std::string data, const std::string& name, int vocab_size,
                                                const std::string& eos_token) {
  // A SentencePiece model is a protobuf whose first field (pieces, field 1, length-delimited)
  // starts with the byte 0x0A; a tokenizer.bin starts with a small int32 max_token_length,
  // whose first byte is never 0x0A for real vocabularies (lengths 10 and 266.. aside, which
  // the .bin extension settles).
  if (is_tokenizer_json(data)) return hf_tokenizer(std::move(data), name, eos_token);
  const bool bin_name = std::filesystem::path(name).extension() == ".bin";
  if (!data.empty() && data[0] == 0x0A && !bin_name) return sentencepiece_tokenizer(std::move(data), name);
  return llama2c_tokenizer(std::move(data), name, vocab_size);
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, int vocab_size) {
  if (!std::filesystem::exists(path)) throw_input("{}: tokenizer file not found", path);
  std::string data = read_file(path);
  if (is_tokenizer_json(data)) return hf_tokenizer(std::move(data), path, hf_eos_token(path));
  return tokenizer_from_bytes(std::move(data), path, vocab_size);
}

}  // namespace edkm
