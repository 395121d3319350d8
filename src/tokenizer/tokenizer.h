// tokenizer: text <-> token ids for LLaMA-family models.
//   - llama2.c tokenizer.bin (score-ordered BPE with byte fallback), e.g. stories260K's tok512.bin
//   - SentencePiece .model files (the Llama-2 tokenizer), through libsentencepiece
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

  enum class Kind { kLlama2c, kSentencePiece };
  virtual Kind kind() const = 0;
  // Where it came from (a path, or the file it was embedded in), and the tokenizer file's
  // bytes, which exported models carry.
  const std::string& name() const { return name_; }
  const std::string& data() const { return data_; }
  // The conventional file name: tokenizer.model or tokenizer.bin.
  std::string file_name() const { return kind() == Kind::kSentencePiece ? "tokenizer.model" : "tokenizer.bin"; }

  // Concatenated pieces, BOS and EOS dropped.
  std::string decode(const std::vector<int>& tokens) const;

 protected:
  Tokenizer(std::string name, std::string data) : name_(std::move(name)), data_(std::move(data)) {}

 private:
  std::string name_, data_;
};

// By content: a SentencePiece model (protobuf) or a llama2.c tokenizer.bin. vocab_size: how
// many entries a tokenizer.bin must hold (its format does not say); 0 = read all.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, int vocab_size = 0);
// The same from a file's bytes; `name` appears in error messages.
std::unique_ptr<Tokenizer> tokenizer_from_bytes(std::string data, const std::string& name, int vocab_size = 0);

std::unique_ptr<Tokenizer> llama2c_tokenizer(std::string data, const std::string& name, int vocab_size = 0);
std::unique_ptr<Tokenizer> sentencepiece_tokenizer(std::string data, const std::string& name);

}  // namespace edkm
