// train: fine-tuning (and calibration) data. Three kinds of file:
//   - Alpaca-style JSON array or JSONL of {"instruction", "input", "output"}: each example is
//     BOS + the Stanford Alpaca prompt + the response + EOS, with the loss on the response (and
//     EOS) only;
//   - documents, a JSON array or JSONL of {"text"} (C4): each document BOS + text + EOS, all of
//     them one stream cut into windows as plain text is; the last val_fraction of the documents
//     is held out;
//   - plain text (anything else): BOS + the text, cut into windows of seq_len + 1 tokens
//     (inputs [0, L), targets [1, L]) with the loss on every token.
// Held out for validation: for Alpaca, the last val_fraction of examples (in file order); for
// plain text, the bytes from heldout_offset(text, val_fraction) on (common/text.h), tokenized on
// their own, so that `edkm eval --heldout` and `edkm perplexity --heldout` score exactly the text
// that training never saw.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm {

struct Example {
  std::vector<int> tokens;  // inputs
  std::vector<int> labels;  // targets aligned with tokens; kIgnoreIndex = no loss
};

struct DataOptions {
  int64_t seq_len = 256;
  double val_fraction = 0.1;
  // Alpaca: concatenate examples into seq_len windows instead of one (padded) example per row.
  bool pack = false;
};

struct Dataset {
  std::string source;
  std::string digest;  // checksum of the file's contents: the same data under another path is the same
  std::string kind;    // "alpaca", "documents" or "text"
  std::vector<Example> train, val;
  int64_t truncated = 0;  // examples cut at seq_len
  int64_t dropped = 0;    // examples with no response token within seq_len
  int64_t train_tokens() const;  // tokens with a loss
};

// The Stanford Alpaca prompt (everything before the response).
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

// Reads and tokenizes a data file. InputError for a missing, malformed or empty file, or one
// from which no training example survives.
Dataset load_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opts);

// Several data files as one mixture, as Hugging Face's concatenate_datasets makes it: each file
// is read, held out and windowed on its own (load_dataset, so an Alpaca file keeps its
// response-only loss beside a C4 file's every-token loss), and the training and held-out
// examples are the files' concatenations, in the order given. Training draws uniformly from the
// union, so a file's share of the steps is its share of the training examples. One path is
// load_dataset itself (the same digest, so checkpoints of single-file runs resume).
Dataset load_datasets(const std::vector<std::string>& paths, const Tokenizer& tok, const DataOptions& opts);

// A batch of examples, right-padded to the longest with pad_id (labels kIgnoreIndex).
struct Batch {
  at::Tensor tokens;  // [B, T] int64
  at::Tensor labels;  // [B, T] int64
  int64_t loss_tokens = 0;
};
Batch make_batch(const std::vector<Example>& data, const std::vector<int64_t>& indices, int pad_id);

// The order examples are visited in epoch `epoch`: a permutation of [0, n) that depends only on
// (seed, epoch), so a resumed run visits the same examples as an uninterrupted one.
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace edkm
