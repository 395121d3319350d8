#include "eval/harness.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <numeric>
#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/text.h"

namespace edkm {

std::pair<std::vector<int>, std::vector<int>> encode_pair(const Tokenizer& tok, const std::string& context,
                                                          const std::string& continuation) {
  std::string ctx = context, cont = continuation;
  size_t end = ctx.find_last_not_of(" \t\n\r\v\f");  // Python's str.rstrip() (ASCII whitespace)
  const size_t spaces = end == std::string::npos ? ctx.size() : ctx.size() - end - 1;
  if (spaces > 0) {
    cont = ctx.substr(ctx.size() - spaces) + cont;
    ctx.resize(ctx.size() - spaces);
  }
  std::vector<int> whole = tok.encode(ctx + cont, /*bos=*/true, /*eos=*/false);
  std::vector<int> c = tok.encode(ctx, true, false);
  const size_t n = std::min(c.size(), whole.size() - 1);  // at least one continuation token
  return {std::vector<int>(whole.begin(), whole.begin() + n), std::vector<int>(whole.begin() + n, whole.end())};
}

std::vector<Response> loglikelihoods(const Llama& model, const Tokenizer& tok, const std::vector<Choice>& requests,
                                     const EvalOptions& opts, const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t max_len = opts.max_len > 0 ? std::min(opts.max_len, model.config().max_seq_len) : model.config().max_seq_len;
  struct Req {
    std::vector<int> input;  // model input (context + continuation minus the last token, truncated)
    int64_t cont;            // continuation tokens = the last `cont` positions' targets
    std::vector<int> targets;
  };
  std::vector<Req> reqs;
  for (const auto& r : requests) {
    auto [ctx, cont] = encode_pair(tok, r.context, r.continuation);
    std::vector<int> all(ctx);
    all.insert(all.end(), cont.begin(), cont.end());
    // Inputs all[0 .. n-2] predict all[1 .. n-1]; keep the last max_len positions.
    const int64_t n = static_cast<int64_t>(all.size()) - 1;
    const int64_t from = std::max<int64_t>(0, n - max_len);
    Req q{std::vector<int>(all.begin() + from, all.end() - 1), static_cast<int64_t>(cont.size()), cont};
    q.cont = std::min<int64_t>(q.cont, static_cast<int64_t>(q.input.size()));
    q.targets.assign(cont.end() - q.cont, cont.end());
    reqs.push_back(std::move(q));
  }
  std::vector<int64_t> order(reqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return reqs[a].input.size() > reqs[b].input.size(); });

  std::vector<Response> out(reqs.size());
  at::NoGradGuard no_grad;
  const int pad = static_cast<int>(model.config().eos_id);
  for (size_t b0 = 0; b0 < order.size(); b0 += opts.batch) {
    const size_t b1 = std::min(order.size(), b0 + static_cast<size_t>(opts.batch));
    const int64_t T = static_cast<int64_t>(reqs[order[b0]].input.size());
    at::Tensor x = at::full({static_cast<int64_t>(b1 - b0), T}, pad, at::kLong);
    for (size_t i = b0; i < b1; ++i) {
      const auto& in = reqs[order[i]].input;
      for (size_t t = 0; t < in.size(); ++t) x[i - b0][t] = in[t];
    }
    at::Tensor logits = model.forward(x.to(model.device())).to(at::kCPU);
    for (size_t i = b0; i < b1; ++i) {
      const Req& q = reqs[order[i]];
      const int64_t len = static_cast<int64_t>(q.input.size());
      at::Tensor lp = at::log_softmax(logits[i - b0].narrow(0, len - q.cont, q.cont).to(at::kDouble), -1);
      at::Tensor tgt = at::tensor(std::vector<int64_t>(q.targets.begin(), q.targets.end()), at::kLong);
      Response& r = out[order[i]];
      r.loglikelihood = lp.gather(1, tgt.unsqueeze(1)).sum().item<double>();
      r.is_greedy = lp.argmax(-1).equal(tgt);
      if (!std::isfinite(r.loglikelihood))
        throw_input("the model's log-likelihood of request {} (context \"{}\") is not finite: its activations overflow",
                    order[i], requests[order[i]].context.substr(0, 60));
    }
    if (progress) progress(static_cast<int64_t>(b1), static_cast<int64_t>(order.size()));
  }
  return out;
}

namespace {

// The choice with the highest log-likelihood, and with the highest per character of the choice
// text; the first wins ties (numpy's argmax). ll[first ..] are the item's choices.
std::pair<int, int> predictions(const MCItem& it, const std::vector<double>& ll, size_t first) {
  int best = 0, best_norm = 0;
  auto normalised = [&](size_t c) { return ll[first + c] / static_cast<double>(choice_length(it.choices[c])); };
  for (size_t c = 1; c < it.choices.size(); ++c) {
    if (ll[first + c] > ll[first + best]) best = static_cast<int>(c);
    if (normalised(c) > normalised(best_norm)) best_norm = static_cast<int>(c);
  }
  return {best, best_norm};
}

// Mean and its standard error (sample standard deviation / sqrt(n)), as the harness reports.
std::pair<double, double> mean_stderr(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, n > 1 ? std::sqrt(ss / (n - 1) / n) : 0.0};
}

}  // namespace

TaskResult score_task(const Task& task, const std::vector<double>& ll) {
  TaskResult r;
  r.task = task.name;
  r.source = task.source;
  r.has_acc_norm = task.acc_norm;
  size_t total = 0;
  for (const auto& it : task.items) total += it.choices.size();
  if (total != ll.size()) throw_invalid("score_task: {} log-likelihoods for {} choices", ll.size(), total);
  std::vector<double> acc, norm;
  size_t k = 0;
  for (const auto& it : task.items) {
    r.chance += 1.0 / static_cast<double>(it.choices.size()) / static_cast<double>(task.items.size());
    const auto [best, best_norm] = predictions(it, ll, k);
    acc.push_back(best == it.gold);
    norm.push_back(best_norm == it.gold);
    k += it.choices.size();
  }
  r.n = static_cast<int64_t>(task.items.size());
  std::tie(r.acc, r.acc_stderr) = mean_stderr(acc);
  if (r.has_acc_norm) std::tie(r.acc_norm, r.acc_norm_stderr) = mean_stderr(norm);
  return r;
}

int64_t choice_length(const Choice& c) {
  int64_t n = 0;
  for (unsigned char b : c.choice) n += (b & 0xC0) != 0x80;  // count lead bytes, not continuation bytes
  return std::max<int64_t>(1, n);
}

nlohmann::json sample_json(const Task& task, size_t item, const std::vector<Response>& responses, size_t first) {
  const MCItem& it = task.items[item];
  std::vector<double> ll;
  for (size_t c = 0; c < it.choices.size(); ++c) ll.push_back(responses[first + c].loglikelihood);
  nlohmann::json args = nlohmann::json::object(), resps = nlohmann::json::array(), filtered = nlohmann::json::array();
  for (size_t c = 0; c < it.choices.size(); ++c) {
    args[fmt::format("gen_args_{}", c)] = {{"arg_0", it.choices[c].context}, {"arg_1", it.choices[c].continuation}};
    const Response& r = responses[first + c];
    resps.push_back({{r.loglikelihood, r.is_greedy}});
    filtered.push_back({r.loglikelihood, r.is_greedy});
  }
  const auto [best, best_norm] = predictions(it, ll, 0);
  nlohmann::json j = {{"doc_id", item}, {"target", it.gold}, {"arguments", args}, {"resps", resps},
                      {"filtered_resps", filtered}, {"filter", "none"}, {"pred", best}, {"acc", best == it.gold ? 1.0 : 0.0}};
  if (task.acc_norm) j["pred_norm"] = best_norm, j["acc_norm"] = best_norm == it.gold ? 1.0 : 0.0;
  return j;
}

TaskResult evaluate_task(const Llama& model, const Tokenizer& tok, const Task& task_in, const EvalOptions& opts,
                         const std::function<void(int64_t, int64_t)>& progress, std::vector<nlohmann::json>* samples) {
  Task task = task_in;
  if (opts.limit > 0 && static_cast<int64_t>(task.items.size()) > opts.limit) task.items.resize(opts.limit);
  std::vector<Choice> reqs;
  for (const auto& it : task.items) reqs.insert(reqs.end(), it.choices.begin(), it.choices.end());
  auto t0 = std::chrono::steady_clock::now();
  const std::vector<Response> responses = loglikelihoods(model, tok, reqs, opts, progress);
  std::vector<double> ll;
  for (const auto& r : responses) ll.push_back(r.loglikelihood);
  TaskResult r = score_task(task, ll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (samples) {
    size_t first = 0;
    for (size_t i = 0; i < task.items.size(); ++i) {
      samples->push_back(sample_json(task, i, responses, first));
      samples->back()["task"] = task.name;
      first += task.items[i].choices.size();
    }
  }
  return r;
}

nlohmann::json TaskResult::to_json() const {
  nlohmann::json j = {{"source", source}, {"n", n}, {"acc", acc}, {"acc_stderr", acc_stderr},
                      {"chance", chance}, {"seconds", seconds}};
  if (has_acc_norm) j["acc_norm"] = acc_norm, j["acc_norm_stderr"] = acc_norm_stderr;
  return j;
}

double PerplexityTaskResult::word_perplexity() const { return std::exp(ppl.nll / std::max<int64_t>(1, words)); }
double PerplexityTaskResult::bits_per_byte() const { return ppl.nll / (std::max<int64_t>(1, bytes) * std::log(2.0)); }

nlohmann::json PerplexityTaskResult::to_json() const {
  return {{"source", source},           {"heldout", heldout},             {"tokens", ppl.tokens},           {"context", ppl.context},
          {"stride", ppl.stride},       {"nats_per_token", ppl.nats_per_token()}, {"token_perplexity", ppl.perplexity()},
          {"words", words},             {"word_perplexity", word_perplexity()},    {"bytes", bytes},
          {"bits_per_byte", bits_per_byte()}, {"seconds", seconds}};
}

PerplexityTaskResult evaluate_perplexity(const Llama& model, const Tokenizer& tok, const std::string& name,
                                         const std::string& path, const PerplexityOptions& opts, double heldout,
                                         const std::function<void(int64_t, int64_t)>& progress) {
  PerplexityTaskResult r;
  r.task = name;
  r.source = path;
  r.heldout = heldout;
  const std::string text = read_heldout_text(path, heldout);
  std::istringstream words(text);
  for (std::string w; words >> w;) ++r.words;
  r.bytes = static_cast<int64_t>(text.size());
  auto t0 = std::chrono::steady_clock::now();
  r.ppl = perplexity(model, tok.encode(text, true, false), opts, [&](int64_t d, int64_t t, double) {
    if (progress) progress(d, t);
  });
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace edkm
