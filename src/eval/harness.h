// Scoring as lm-evaluation-harness does, so numbers are comparable with published tables:
// the log-likelihood of each choice's continuation given its context; acc = the choice with the
// highest log-likelihood is the gold one (the first on ties, as numpy's argmax); acc_norm = the
// same after dividing each by the length of the choice text in characters (Python's len of
// doc_to_choice's string: without the " " target delimiter, code points not bytes); standard
// errors of the mean (sample variance, n - 1).
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "eval/perplexity.h"
#include "eval/tasks.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm {

struct EvalOptions {
  int64_t limit = 0;     // first N items of each task (0: all)
  int64_t batch = 16;    // sequences per forward pass
  int64_t max_len = 0;   // 0: the model's context; longer requests lose their oldest tokens
};

// The harness's tokenization of a request: trailing whitespace of the context moves to the
// continuation; the continuation's tokens are those of context + continuation beyond the
// context's own tokens (BOS first).
std::pair<std::vector<int>, std::vector<int>> encode_pair(const Tokenizer& tok, const std::string& context,
                                                          const std::string& continuation);

// The harness's answer to a log-likelihood request: log P(continuation | context), and whether
// greedy decoding would produce the continuation (every token the argmax).
struct Response {
  double loglikelihood = 0;
  bool is_greedy = false;
};

// The response to each request, batched (longest first) with padding. progress(done, total)
// after each batch.
std::vector<Response> loglikelihoods(const Llama& model, const Tokenizer& tok, const std::vector<Choice>& requests,
                                     const EvalOptions& opts, const std::function<void(int64_t, int64_t)>& progress = {});

struct TaskResult {
  std::string task, source;
  int64_t n = 0;
  double acc = 0, acc_stderr = 0;
  bool has_acc_norm = false;
  double acc_norm = 0, acc_norm_stderr = 0;
  double chance = 0;  // the accuracy of guessing uniformly: the mean over items of 1 / choices
  double seconds = 0;
  nlohmann::json to_json() const;
};

// Scores a task from the log-likelihoods of its choices (in item order, choices in order).
TaskResult score_task(const Task& task, const std::vector<double>& ll);

// The length acc_norm divides by: the characters (UTF-8 code points) of the choice text.
int64_t choice_length(const Choice& c);

// One item as lm-evaluation-harness's --log_samples writes it: doc_id, target, arguments
// ({"gen_args_i": {"arg_0": context, "arg_1": continuation}}), resps ([[[ll, is_greedy]], ...]),
// filtered_resps, acc and (where the task has it) acc_norm; and the predictions, pred and
// pred_norm, which the harness leaves implicit.
nlohmann::json sample_json(const Task& task, size_t item, const std::vector<Response>& responses, size_t first);

// Scores a task; with `samples`, one sample_json per item is appended to it.
TaskResult evaluate_task(const Llama& model, const Tokenizer& tok, const Task& task, const EvalOptions& opts,
                         const std::function<void(int64_t, int64_t)>& progress = {},
                         std::vector<nlohmann::json>* samples = nullptr);

// Perplexity of a text file, with the tokenizer-independent figures the harness reports for
// WikiText: word perplexity exp(NLL / words) and bits per byte NLL / (bytes ln 2).
// heldout > 0 scores only the tail of the file that `compress --val-fraction heldout` holds out
// (common/text.h heldout_offset); words and bytes count that tail.
struct PerplexityTaskResult {
  std::string task, source;
  double heldout = 0;
  PerplexityResult ppl;
  int64_t words = 0, bytes = 0;
  double seconds = 0;
  double word_perplexity() const;
  double bits_per_byte() const;
  nlohmann::json to_json() const;
};
PerplexityTaskResult evaluate_perplexity(const Llama& model, const Tokenizer& tok, const std::string& name,
                                         const std::string& path, const PerplexityOptions& opts, double heldout,
                                         const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace edkm
