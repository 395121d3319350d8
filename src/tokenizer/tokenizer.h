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
  // The file it was loaded from (recorded in exported models).
  virtual const std::string& path() const = 0;

  // Concatenated pieces, BOS and EOS dropped.
  std::string decode(const std::vector<int>& tokens) const;
};

// By file: a SentencePiece model (protobuf, usually .model) or a llama2.c tokenizer.bin.
// vocab_size: how many entries a tokenizer.bin must hold (its format does not say); 0 = read all.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, int vocab_size = 0);

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path, int vocab_size = 0);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& path);

}  // namespace edkm
