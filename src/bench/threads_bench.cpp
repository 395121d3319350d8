// `edkm bench threads`: one thread against the default thread count, on an idle machine and
// with another process keeping one core busy, for decoding, perplexity and a training step of
// stories260K. The settings alternate round by round so that drift in the machine's speed
// reaches them alike.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>

#include "bench/bench.h"
#include "common/atomic_file.h"
#include "common/threads.h"
#include "eval/perplexity.h"
#include "model/generate.h"
#include "pipeline/load.h"

namespace edkm::bench {
namespace {

// A child process that spins on one core until the object dies: the "browser tab" or CI
// neighbour that a laptop or a shared runner has.
class BusyProcess {
 public:
  BusyProcess() : pid_(::fork()) {
    if (pid_ == 0)
      for (volatile uint64_t i = 0;; i = i + 1) {
      }
  }
  ~BusyProcess() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }

 private:
  pid_t pid_;
};

}  // namespace

ThreadsBenchResult run_threads_bench(const ThreadsBenchOptions& o) {
  ThreadsBenchResult r;
  r.usable_cores = usable_cores();
  LoadedModel m = load_model(o.model);
  const std::string text = read_file(o.text).substr(0, o.text_bytes);
  const std::vector<int> tokens = m.tokenizer->encode(text, true, false);
  r.perplexity_tokens = static_cast<int64_t>(tokens.size());

  // The three workloads, each returning its time.
  auto decode = [&] {
    GenerateOptions g;
    g.prompt = "Once upon a time";
    g.max_tokens = o.decode_tokens;
    g.sampler.temperature = 0;
    return generate(m.model, *m.tokenizer, g, [](const std::string&) {}).seconds;
  };
  auto ppl = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    PerplexityOptions p;
    perplexity(m.model, tokens, p);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  Llama trainable = m.model;
  for (auto& [n, t] : trainable.weights()) t = t.detach().clone().requires_grad_(true);
  at::manual_seed(0);
  const int64_t vocab = trainable.config().vocab_size;
  const at::Tensor x = at::randint(0, vocab, {8, o.train_seq}, at::kLong), y = at::randint(0, vocab, {8, o.train_seq}, at::kLong);
  auto train_step = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    next_token_loss(trainable.forward(x), y).backward();
    for (auto& [n, t] : trainable.weights()) t.mutable_grad().reset();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const std::vector<std::pair<std::string, std::function<double()>>> workloads = {
      {fmt::format("decode {} tokens", o.decode_tokens), decode},
      {fmt::format("perplexity {} tokens", tokens.size()), ppl},
      {fmt::format("training step 8 x {}", o.train_seq), train_step}};

  for (const bool loaded : {false, true}) {
    std::unique_ptr<BusyProcess> busy;
    if (loaded) busy = std::make_unique<BusyProcess>();
    // What `edkm` would choose now, and what it chose before it looked (every core).
    const int chosen = idle_cores();
    const std::vector<std::pair<std::string, int>> settings = {
        {"1 thread", 1}, {fmt::format("every core ({})", r.usable_cores), r.usable_cores},
        {fmt::format("default ({})", chosen), chosen}};
    for (const auto& [name, run] : workloads) {
      std::vector<double> best(settings.size(), 1e30);
      for (int rep = 0; rep < o.reps; ++rep)
        for (size_t s = 0; s < settings.size(); ++s) {
          at::set_num_threads(settings[s].second);
          if (rep == 0) run();  // warm-up at this thread count
          best[s] = std::min(best[s], run());
        }
      for (size_t s = 0; s < settings.size(); ++s)
        r.rows.push_back({name, loaded ? "one core busy" : "idle", settings[s].first, settings[s].second, best[s],
                          best[s] / best[0]});
    }
  }
  return r;
}

std::string ThreadsBenchResult::table() const {
  std::string s = fmt::format("threads: {} usable cores; best of the rounds, settings alternated\n", usable_cores);
  s += fmt::format("{:<24} {:<14} {:<16} {:>10} {:>14}\n", "workload", "machine", "threads", "seconds", "vs 1 thread");
  for (const auto& row : rows)
    s += fmt::format("{:<24} {:<14} {:<16} {:>10.3f} {:>13.2f}x\n", row.workload, row.machine, row.setting, row.seconds,
                     row.vs_one_thread);
  return s;
}

nlohmann::json to_json(const ThreadsBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : r.rows)
    rows.push_back({{"workload", row.workload}, {"machine", row.machine}, {"setting", row.setting},
                    {"threads", row.threads}, {"seconds", row.seconds}, {"vs_one_thread", row.vs_one_thread}});
  return {{"benchmark", "threads"}, {"usable_cores", r.usable_cores}, {"rows", rows}};
}

}  // namespace edkm::bench
