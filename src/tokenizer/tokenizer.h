// tokenizer: text <-> token ids for LLaMA-family models.
//   - llama2.c tokenizer.bin (score-ordered BPE with byte fallback), e.g. stories260K's tok512.bin
//   - SentencePiece .model files (the Llama-2 tokenizer), through libsentencepiece
//   - Hugging Face tokenizer.json with a BPE model: byte-level (Llama-3, Qwen2/3, SmolLM2, GPT-2)
//     or SentencePiece-style (Llama-2, Mistral, TinyLlama), as the `tokenizers` library encodes
//     them (hf_tokenizer.cpp)
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace edkm {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // bos/eos: prepend BOS / append EOS.
  virtual std::vector<int> encode(const std::string& text, bool bos, bool eos) const = 0;
  // The text of `token` when it follows `prev` (SentencePiece drops the space that starts the
  // first piece after BOS; byte pieces <0xAB> become the byte), for streaming output.
  virtual std::string piece(int prev, int token) const = 0;
  virtual int vocab_size() const = 0;
  virtual int bos_id() const { return 1; }
  virtual int eos_id() const { return 2; }
  // The EOS token's text when the tokenizer file itself does not say which token it is (a
  // tokenizer.json's EOS comes from the tokenizer_config.json beside it): compressed models and
  // exported directories carry it next to the file. "" otherwise.
  virtual std::string eos_token() const { return {}; }

  enum class Kind { kLlama2c, kSentencePiece, kHuggingFace };
  virtual Kind kind() const = 0;
  // Where it came from (a path, or the file it was embedded in), and the tokenizer file's
  // bytes, which exported models carry.
  const std::string& name() const { return name_; }
  const std::string& data() const { return data_; }
  // The conventional file name: tokenizer.model, tokenizer.bin or tokenizer.json.
  std::string file_name() const;

  // Concatenated pieces, BOS and EOS dropped.
  std::string decode(const std::vector<int>& tokens) const;

 protected:
  Tokenizer(std::string name, std::string data) : name_(std::move(name)), data_(std::move(data)) {}

 private:
  std::string name_, data_;
};

// By content: a tokenizer.json (JSON), a SentencePiece model (protobuf) or a llama2.c
// tokenizer.bin. A tokenizer.json's EOS is the eos_token of the tokenizer_config.json beside it. vocab_size: how
// many entries a tokenizer.bin must hold (its format does not say); 0 = read all.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, int vocab_size = 0);
// The same from a file's bytes; `name` appears in error messages; eos_token: a tokenizer.json's
// EOS text (Tokenizer::eos_token()).
std::unique_ptr<Tokenizer> tokenizer_from_bytes(std::string data, const std::string& name, int vocab_size = 0,
                                                const std::string& eos_token = "");

std::unique_ptr<Tokenizer> llama2c_tokenizer(std::string data, const std::string& name, int vocab_size = 0);
std::unique_ptr<Tokenizer> sentencepiece_tokenizer(std::string data, const std::string& name);
// eos_token: the EOS's text ("" = none known: encode(eos = true) adds nothing).
std::unique_ptr<Tokenizer> hf_tokenizer(std::string data, const std::string& name, const std::string& eos_token = "");
// The eos_token of the tokenizer_config.json beside a tokenizer.json ("" when there is none).
std::string hf_eos_token(const std::string& tokenizer_json_path);

}  // namespace edkm
