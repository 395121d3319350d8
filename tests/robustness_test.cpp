// What a user can do wrong, and what can go wrong underneath them: outputs that would overwrite
// inputs, NaN settings and weights, binary "text", damaged files, stopped and restarted runs,
// missing peers, and the messages each of these gets. Each test is a probe that once failed.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/atomic_file.h"
#include "common/checksum.h"
#include "common/error.h"
#include "common/finite.h"
#include "common/text.h"
#include "common/threads.h"
#include "eval/perplexity.h"
#include "model/generate.h"
#include "pipeline/load.h"
#include "test_util.h"

namespace edkm {
namespace {

namespace fs = std::filesystem;

const std::string kStories = "models/stories260K/stories260K.bin";
const std::string kText = "eval/tinystories/val_a.txt";

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A copy of stories260K (and its tokenizer) in `dir`, optionally with a NaN at weight `nan_at`
// of the token embedding (the first tensor after the 28-byte llama2.c v0 header).
std::string copy_stories(const test::TempDir& tmp, const std::string& name, int64_t nan_at = -1) {
  std::string bytes = read_file(test::asset(kStories));
  if (nan_at >= 0) {
    const float nan = std::nanf("");
    std::memcpy(bytes.data() + 28 + 4 * nan_at, &nan, 4);
  }
  write_file_atomic(tmp / name, bytes);
  fs::copy_file(test::asset("models/stories260K/tok512.bin"), tmp / "tok512.bin", fs::copy_options::skip_existing);
  return tmp / name;
}

// A 3-bit k-means file of stories260K (quick to make: no training).
std::string quantized_stories(const test::TempDir& tmp, const std::string& name) {
  test::CliResult r = test::run_cli("quantize -t 1 --bits 3 -m " + test::asset(kStories) + " -o " + tmp / name, tmp);
  EXPECT_EQ(r.code, 0) << r.err;
  return tmp / name;
}

void flip_byte(const std::string& path, int64_t offset) {
  std::string b = read_file(path);
  b[offset] = static_cast<char>(b[offset] ^ 0x10);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << b;
}

TEST(Robustness, OutputsMayNotOverwriteInputs) {
  test::TempDir tmp;
  const std::string model = copy_stories(tmp, "m.bin");
  const std::string before = read_file(model);
  fs::create_directory(tmp / "sub");
  fs::create_symlink(model, tmp / "link.bin");
  // The same file by its name, by a symbolic link, and spelled through "..".
  for (const std::string& out : std::vector<std::string>{model, tmp / "link.bin", tmp / "sub/../m.bin"}) {
    test::CliResult r = test::run_cli("quantize -t 1 -m " + model + " -o " + out, tmp);
    EXPECT_EQ(r.code, 1) << out;
    EXPECT_TRUE(contains(r.err, "is the input given with -m")) << r.err;
  }
  EXPECT_EQ(read_file(model), before);

  write_file_atomic(tmp / "data.txt", read_file(test::asset(kText)).substr(0, 4000));
  test::CliResult r = test::run_cli("compress -t 1 -q --steps 1 -m " + model + " -d " + tmp / "data.txt" + " -o " +
                                        tmp / "data.txt", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "is the input given with -d")) << r.err;
  EXPECT_EQ(read_file(tmp / "data.txt"), read_file(test::asset(kText)).substr(0, 4000));

  // A Hugging Face directory converted onto itself.
  ASSERT_EQ(test::run_cli("convert -m " + model + " -o " + tmp / "hf", tmp).code, 0);
  r = test::run_cli("convert -m " + tmp / "hf" + " -o " + tmp / "hf/.", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "is the input given with -m")) << r.err;

  // Two outputs on one path.
  EXPECT_THROW(check_outputs_distinct({tmp / "a", tmp / "sub/../a"}, {}), InputError);
}

TEST(Robustness, RemoveTreeRemovesEverythingBelowButNotWhatLinksPointTo) {
  namespace fs = std::filesystem;
  test::TempDir tmp;
  fs::create_directories(tmp / "x/a/b");
  fs::create_directories(tmp / "keep");
  write_file_atomic(tmp / "x/a/b/f", "1");
  write_file_atomic(tmp / "x/g", "2");
  write_file_atomic(tmp / "keep/h", "3");
  fs::create_directory_symlink(tmp / "keep", tmp / "x/link");
  remove_tree(tmp / "x");
  EXPECT_FALSE(fs::exists(tmp / "x"));
  EXPECT_EQ(read_file(tmp / "keep/h"), "3");
  remove_tree(tmp / "x");  // nothing there: no error
}

TEST(Robustness, NaNSettingsAndWeightsAreErrorsNotCrashes) {
  test::TempDir tmp;
  const std::string base = "generate -t 1 -n 4 -m " + test::asset(kStories);
  for (const std::string& flag : {"--top-p nan", "--temperature nan", "--temperature inf", "--top-p -1"}) {
    test::CliResult r = test::run_cli(base + " " + flag, tmp);
    EXPECT_EQ(r.code, 1) << flag << "\n" << r.err;
    EXPECT_TRUE(contains(r.err, "edkm: error:")) << r.err;
  }
  // The DKM settings' flags (cluster/settings.h) check their ranges and names before any work.
  const std::string compress = "compress -t 1 -q -m " + test::asset(kStories) + " -d " + test::asset(kText) + " -o " +
                               tmp / "flags.edkm";
  for (const auto& [flag, message] : std::vector<std::pair<std::string, std::string>>{
           {"--tau nan", "tau must be > 0, got nan"},
           {"--tau 0", "tau must be > 0, got 0"},
           {"--bits 9", "bits must be in 1..8, got 9"},
           {"--zero-threshold 1", "zero_threshold must be in [0, 1), got 1"},
           {"--cluster-dtype fp8", "unknown cluster dtype 'fp8'"},
           {"--dkm-method fast", "unknown DKM method 'fast'"}}) {
    test::CliResult r = test::run_cli(compress + " " + flag, tmp);
    EXPECT_EQ(r.code, 1) << flag << "\n" << r.err;
    EXPECT_TRUE(contains(r.err, message)) << flag << "\n" << r.err;
  }
  EXPECT_FALSE(fs::exists(tmp / "flags.edkm"));
  // Sampling from NaN logits (the crash behind `generate` on a NaN model).
  Sampler s({1.0f, 0.9f, 1});
  at::Tensor logits = at::zeros({8});
  logits[3] = NAN;
  EXPECT_THROW(s.sample(logits), InputError);

  // A model with one NaN weight: every command that reads it says which tensor.
  const std::string nan_model = copy_stories(tmp, "nan.bin", 10);
  for (const std::string& cmd : std::vector<std::string>{"generate -n 4 --temperature 1", "perplexity --text " + test::asset(kText), "eval --tasks copa --limit 2 -q",
        "quantize --bits 3 -o " + tmp / "q.edkm", "convert -o " + tmp / "nan_hf"}) {
    test::CliResult r = test::run_cli(cmd + " -t 1 -m " + nan_model, tmp);
    EXPECT_EQ(r.code, 1) << cmd << "\n" << r.err;
    EXPECT_TRUE(contains(r.err, "tensor 'model.embed_tokens.weight': 1 of 32768 values are NaN or Inf")) << cmd << "\n" << r.err;
  }
  EXPECT_FALSE(fs::exists(tmp / "q.edkm"));
  EXPECT_FALSE(fs::exists(tmp / "nan_hf/model.safetensors"));

  // Writers refuse what they would otherwise write.
  at::Tensor bad = at::ones({2, 3});
  bad[1][2] = INFINITY;
  try {
    check_finite(bad, "t.safetensors: tensor 'w'");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_TRUE(contains(e.what(), "t.safetensors: tensor 'w': 1 of 6 values are NaN or Inf (the first, inf, at index [1, 2])"))
        << e.what();
  }

  // A non-finite loss in training names the step.
  write_file_atomic(tmp / "data.txt", read_file(test::asset(kText)).substr(0, 20000));
  test::CliResult r = test::run_cli("compress -t 1 -q --steps 4 --seq-len 32 --batch 2 --grad-clip 0 --lr 1e30 -m " +
                                        test::asset(kStories) + " -d " + tmp / "data.txt" + " -o " + tmp / "div.edkm",
                                    tmp);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_TRUE(contains(r.err, "training step ")) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "div.edkm"));
  EXPECT_FALSE(fs::exists(tmp / "div.edkm.metrics.jsonl"));  // nothing to resume, so no metrics either
}

// A broken internal invariant is a bug, reported as one (std::logic_error with the condition and
// the place), never taken for bad input.
TEST(Robustness, InternalAssertNamesTheConditionAndThePlace) {
  const int bits = 5;
  try {
    EDKM_ASSERT(bits <= 4);
    ADD_FAILURE();
  } catch (const std::logic_error& e) {
    EXPECT_TRUE(contains(e.what(), "robustness_test.cpp:")) << e.what();
    EXPECT_TRUE(contains(e.what(), "bits <= 4 does not hold; this is a bug in edkm")) << e.what();
  }
  EXPECT_NO_THROW(EDKM_ASSERT(bits == 5));
}

TEST(Robustness, PerplexityScoresTextOfOneTokenMoreThanItsWindows) {
  LoadedModel m = load_model(test::asset(kStories));
  std::vector<int> tokens = m.tokenizer->encode(read_file(test::asset(kText)).substr(0, 8000), true, false);
  ASSERT_GT(tokens.size(), 129u);
  tokens.resize(2 * 64 + 1);  // the last disjoint window would hold one token
  PerplexityOptions o;
  o.context = 64;
  PerplexityResult r = perplexity(m.model, tokens, o);
  EXPECT_EQ(r.windows, 2);
  EXPECT_EQ(r.tokens, 2 * 63);  // each window's first token has no history and is not scored
  EXPECT_TRUE(std::isfinite(r.perplexity()));
}

TEST(Robustness, NumbersThatWouldMislead) {
  test::TempDir tmp;
  const std::string model = test::asset(kStories);
  write_file_atomic(tmp / "data.txt", read_file(test::asset(kText)).substr(0, 20000));
  const std::string base = "compress -t 1 -q --seq-len 32 --batch 2 -m " + model + " -d " + tmp / "data.txt";
  // Nothing held out: no validation loss, rather than 0.0000.
  test::CliResult r = test::run_cli(base + " --steps 1 --val-fraction 0 -o " + tmp / "a.edkm", tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "validation loss: none")) << r.out;
  r = test::run_cli(base + " --steps 1 --val-fraction 0 --json -o " + tmp / "a.edkm", tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(nlohmann::json::parse(r.out)["val_loss"].is_null());
  // --steps 0 is refused, not run as one step; a fractional bit width is refused, not truncated.
  r = test::run_cli(base + " --steps 0 -o " + tmp / "b.edkm", tmp);
  EXPECT_EQ(r.code, 1);
  write_file_atomic(tmp / "bits.json", R"({"bits": 3.7})");
  r = test::run_cli(base + " --steps 1 --config " + tmp / "bits.json" + " -o " + tmp / "b.edkm", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "setting 'bits' must be an integer")) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "b.edkm"));

  // Binary data is not text: refused with the byte offset.
  std::string binary = "Once upon a time\n";
  binary += std::string("\xFF\xFE\x01", 3);
  write_file_atomic(tmp / "bin.txt", binary);
  r = test::run_cli("compress -t 1 -q --steps 1 -m " + model + " -d " + tmp / "bin.txt" + " -o " + tmp / "c.edkm", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "bin.txt: not UTF-8 text: invalid byte 0xFF at byte offset 17")) << r.err;
  r = test::run_cli("perplexity -t 1 -q -m " + model + " --text " + tmp / "bin.txt", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "byte offset 17")) << r.err;
  EXPECT_NO_THROW(check_utf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", "ok"));
  EXPECT_THROW(check_utf8("\xC0\xAF", "overlong"), InputError);
  EXPECT_THROW(check_utf8("\xED\xA0\x80", "surrogate"), InputError);
  EXPECT_THROW(check_utf8("\xE2\x82", "truncated"), InputError);

  // More new tokens than the context holds: generation says that it stopped there.
  LoadedModel m = load_model(model);
  LlamaConfig c = m.model.config();
  c.max_seq_len = 12;
  Llama short_context(c, m.model.weights(), "stories260K, 12-token context");
  GenerateOptions go;
  go.prompt = "Once upon a time";
  go.max_tokens = 50;
  go.sampler.temperature = 0;
  GenerateStats st = generate(short_context, *m.tokenizer, go, [](const std::string&) {});
  EXPECT_TRUE(st.context_full);
  EXPECT_EQ(st.prompt_tokens + st.generated, 13);  // the last token is predicted from a full context
}

TEST(Robustness, DamagedFilesAreDetected) {
  test::TempDir tmp;
  const std::string file = quantized_stories(tmp, "q.edkm");
  // A byte inside the last tensor's data (the tokenizer or an index stream) changes.
  const int64_t size = static_cast<int64_t>(fs::file_size(file));
  flip_byte(file, size - 100);
  test::CliResult r = test::run_cli("perplexity -t 1 -q -m " + file + " --text " + test::asset(kText), tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "q.edkm: checksum mismatch")) << r.err;
  r = test::run_cli("info " + file, tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "checksum mismatch")) << r.err;
  // --no-verify reads it anyway (and what it reads is still checked for structure).
  r = test::run_cli("--no-verify info " + file, tmp);
  EXPECT_EQ(r.code, 0) << r.err;
  // (A damaged checkpoint: TerminatedRunsCheckpointAndRestartsAreSafe.)
}

// Runs `args` in the background; sends `sig` once `ready` exists; returns the exit status.
int run_and_signal(const std::string& args, const std::string& ready, int sig, const test::TempDir& tmp) {
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string cmd = std::string(EDKM_BINARY) + " " + args + " > " + tmp / "bg_out.txt" + " 2> " + tmp / "bg_err.txt";
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 1200 && !fs::exists(ready); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  kill(pid, sig);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(Robustness, TerminatedRunsCheckpointAndRestartsAreSafe) {
  test::TempDir tmp;
  write_file_atomic(tmp / "data.txt", read_file(test::asset(kText)).substr(0, 60000));
  const std::string out = tmp / "c.edkm";
  const std::string run = "compress -t 1 -q --seq-len 32 --batch 2 --steps 60 --val-fraction 0.05 -m " +
                          test::asset(kStories) + " -d " + tmp / "data.txt" + " -o " + out;
  // A temporary that a SIGKILLed checkpoint write left behind.
  write_file_atomic(out + ".ckpt.tmp.AbC123", "partial");
  // SIGTERM (timeout, Slurm, docker stop) checkpoints like Ctrl-C: once the metrics file shows a step.
  const int code = run_and_signal(run, out + ".metrics.jsonl", SIGTERM, tmp);
  EXPECT_EQ(code, 128 + SIGTERM) << read_file(tmp / "bg_err.txt");
  ASSERT_TRUE(fs::exists(out + ".ckpt")) << read_file(tmp / "bg_err.txt");
  EXPECT_FALSE(fs::exists(out + ".ckpt.tmp.AbC123"));
  EXPECT_FALSE(fs::exists(out));

  // Starting again without --resume would throw the checkpoint away: refused.
  test::CliResult r = test::run_cli(run, tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "a checkpoint of an earlier run exists; continue that run with --resume")) << r.err;

  // The same data under another spelling of its path is the same data; another setting is named.
  const std::string respelled = "compress -t 1 -q --seq-len 32 --batch 2 --steps 60 --val-fraction 0.05 -m " +
                                test::asset(kStories) + " -d " + tmp.path.string() + "/./data.txt -o " + out;
  r = test::run_cli(respelled + " --resume --lr 5e-4", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "lr: 0.001 -> 0.0005")) << r.err;
  EXPECT_LT(r.err.size(), 1000u) << r.err;

  // A damaged checkpoint is not resumed from.
  const std::string saved = read_file(out + ".ckpt");
  flip_byte(out + ".ckpt", static_cast<int64_t>(saved.size()) / 2);
  r = test::run_cli(respelled + " --resume", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "checksum mismatch")) << r.err;
  std::ofstream(out + ".ckpt", std::ios::binary | std::ios::trunc) << saved;

  // Resumed to the end: every step appears once in the metrics, and the checkpoint is gone.
  r = test::run_cli(respelled + " --resume", tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  std::istringstream metrics(read_file(out + ".metrics.jsonl"));
  std::vector<int64_t> steps;
  for (std::string line; std::getline(metrics, line);) steps.push_back(nlohmann::json::parse(line)["step"].get<int64_t>());
  ASSERT_EQ(steps.size(), 60u);
  for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], static_cast<int64_t>(i) + 1);
  EXPECT_FALSE(fs::exists(out + ".ckpt"));
}

TEST(Robustness, MissingPeerIsReportedAndTimesOut) {
  test::TempDir tmp;
  const std::string env = "WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29731 ";
  const std::string cmd = env + EDKM_BINARY + " compress -t 1 -q --steps 1 --dist-timeout 3 -m " + test::asset(kStories) +
                          " -d " + test::asset(kText) + " -o " + tmp / "e.edkm" + " > /dev/null 2> " + tmp / "err.txt";
  const auto t1 = std::chrono::steady_clock::now();
  const int status = std::system(cmd.c_str());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  EXPECT_EQ(WEXITSTATUS(status), 1);
  const std::string err = read_file(tmp / "err.txt");
  EXPECT_TRUE(contains(err, "waiting for 2 learners at 127.0.0.1:29731")) << err;
  EXPECT_TRUE(contains(err, "edkm: error:")) << err;
  EXPECT_LT(seconds, 60);
}

TEST(Robustness, MessagesSayWhatIsWrong) {
  test::TempDir tmp;
  // Command-line errors: exit 1 with the prefix, like every other error.
  test::CliResult r = test::run_cli("compress --no-such-flag", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "edkm: error:")) << r.err;
  r = test::run_cli("compress -m x -d y -o z --lr inf", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "inf is not a positive finite number")) << r.err;
  EXPECT_LT(r.err.size(), 300u) << r.err;
  EXPECT_EQ(test::run_cli("--help", tmp).code, 0);

  // Unknown tasks: the list names every task eval knows.
  r = test::run_cli("eval -t 1 -m " + test::asset(kStories) + " --tasks nope", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "tinystories, wikitext2")) << r.err;

  // A report of results without perplexities plots the accuracies alone; with nothing to plot,
  // it writes nothing.
  nlohmann::json acc_only = {{"label", "a"}, {"method", "dkm"}, {"bits_per_weight", 3.0},
                             {"tasks", {{"copa", {{"n", 4}, {"acc", 0.5}, {"acc_stderr", 0.1}, {"chance", 0.5}}}}},
                             {"perplexity", nlohmann::json::object()}};
  write_file_atomic(tmp / "a.json", acc_only.dump());
  r = test::run_cli("report " + tmp / "a.json" + " -o " + tmp / "rep", tmp);
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(tmp / "rep/report.png"));
  nlohmann::json empty = {{"label", "b"}, {"method", "dkm"}, {"tasks", nlohmann::json::object()}};
  write_file_atomic(tmp / "b.json", empty.dump());
  r = test::run_cli("report " + tmp / "b.json" + " -o " + tmp / "rep2", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "nothing to plot")) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "rep2/report.md"));
}

TEST(Robustness, LogSamplesHoldEveryRequestAndPrediction) {
  test::TempDir tmp;
  test::CliResult r = test::run_cli("eval -t 1 -q --json --assets " + test::assets_dir() + " -m " + test::asset(kStories) +
                                        " --tasks arc_easy,copa --limit 5 --log-samples " + tmp / "s.jsonl",
                                    tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json res = nlohmann::json::parse(r.out);
  std::istringstream lines(read_file(tmp / "s.jsonl"));
  std::map<std::string, std::vector<nlohmann::json>> by_task;
  for (std::string l; std::getline(lines, l);) {
    auto j = nlohmann::json::parse(l);
    by_task[j["task"]].push_back(j);
  }
  ASSERT_EQ(by_task["arc_easy"].size(), 5u);
  ASSERT_EQ(by_task["copa"].size(), 5u);
  for (const auto& [task, items] : by_task) {
    double acc = 0, acc_norm = 0;
    for (const auto& s : items) {
      // The harness's decision, recomputed from the logged requests and responses: argmax of the
      // log-likelihoods, and of them divided by the choice's characters (the continuation less
      // its leading space).
      const auto& resps = s["filtered_resps"];
      size_t best = 0, best_norm = 0;
      auto norm = [&](size_t c) {
        std::string cont = s["arguments"][fmt::format("gen_args_{}", c)]["arg_1"];
        return resps[c][0].get<double>() / static_cast<double>(cont.size() - 1);  // ASCII here
      };
      for (size_t c = 1; c < resps.size(); ++c) {
        if (resps[c][0].get<double>() > resps[best][0].get<double>()) best = c;
        if (norm(c) > norm(best_norm)) best_norm = c;
      }
      EXPECT_EQ(s["pred"].get<size_t>(), best);
      EXPECT_EQ(s["acc"].get<double>(), best == s["target"].get<size_t>() ? 1.0 : 0.0);
      acc += s["acc"].get<double>() / 5;
      if (task == "arc_easy") {
        EXPECT_EQ(s["pred_norm"].get<size_t>(), best_norm);
        acc_norm += s["acc_norm"].get<double>() / 5;
      }
    }
    EXPECT_NEAR(res["tasks"][task]["acc"].get<double>(), acc, 1e-12) << task;
    if (task == "arc_easy") EXPECT_NEAR(res["tasks"][task]["acc_norm"].get<double>(), acc_norm, 1e-12);
  }
}

TEST(Robustness, DefaultThreadsCountTheIdleCores) {
  const int usable = usable_cores();
  const int idle = idle_cores(20);
  EXPECT_GE(idle, 1);
  EXPECT_LE(idle, usable);
  // The benchmark that compares the settings runs and reports each of them for each workload.
  test::TempDir tmp;
  test::CliResult r = test::run_cli("bench threads --json --reps 1 --tokens 4 --text-bytes 1000 --train-seq 16", tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 18u);  // 3 workloads x 2 machine states x 3 settings
  for (const auto& row : j["rows"]) {
    EXPECT_GT(row["seconds"].get<double>(), 0) << row.dump();
    EXPECT_GE(row["threads"].get<int>(), 1) << row.dump();
  }
}

}  // namespace
}  // namespace edkm
