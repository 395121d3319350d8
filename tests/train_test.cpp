// compress: data preparation, clustering plans, exact resume, the Alpaca path, and bad input.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>

#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/text.h"
#include "format/format.h"
#include "pipeline/compress.h"
#include "pipeline/load.h"
#include "test_util.h"

namespace edkm {
namespace {

const std::string kStories = "models/stories260K/stories260K.bin";

TEST(Data, AlpacaTemplateAndResponseOnlyLoss) {
  // The Stanford Alpaca prompt, character for character.
  EXPECT_EQ(alpaca_prompt("Say hi.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
            "\n\n### Instruction:\nSay hi.\n\n### Response:\n");
  EXPECT_EQ(alpaca_prompt("Add.", "2 and 3"),
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n"
            "2 and 3\n\n### Response:\n");
  test::TempDir tmp;
  write_file_atomic(tmp / "a.jsonl", R"({"instruction": "Say hi.", "input": "", "output": "Hi there"})" "\n"
                                     R"({"instruction": "Add.", "input": "2 and 3", "output": "5"})" "\n");
  auto tok = load_tokenizer(test::asset("models/stories260K/tok512.bin"), 512);
  DataOptions o;
  o.val_fraction = 0;
  Dataset d = load_dataset(tmp / "a.jsonl", *tok, o);
  ASSERT_EQ(d.kind, "alpaca");
  ASSERT_EQ(d.train.size(), 2u);
  // Example 1: inputs are BOS + prompt + response; exactly the response and EOS carry a loss.
  const Example& e = d.train[0];
  std::vector<int> full = tok->encode(alpaca_prompt("Say hi.", "") + "Hi there", true, true);
  EXPECT_EQ(e.tokens, std::vector<int>(full.begin(), full.end() - 1));
  std::vector<int> scored;
  for (size_t i = 0; i < e.labels.size(); ++i)
    if (e.labels[i] >= 0) {
      EXPECT_EQ(e.labels[i], full[i + 1]);
      scored.push_back(e.labels[i]);
    }
  ASSERT_FALSE(scored.empty());
  EXPECT_EQ(scored.back(), tok->eos_id());
  scored.pop_back();
  EXPECT_EQ(tok->decode(scored), "Hi there");
  // Every target before the response is masked.
  const size_t prompt_len = tok->encode(alpaca_prompt("Say hi.", ""), true, false).size();
  for (size_t i = 0; i + 1 < prompt_len; ++i) EXPECT_EQ(e.labels[i], -100) << i;
  EXPECT_EQ(d.train_tokens(), static_cast<int64_t>(scored.size() + 1 + tok->encode(alpaca_prompt("Add.", "2 and 3") + "5", true, true).size() -
                                                    tok->encode(alpaca_prompt("Add.", "2 and 3"), true, false).size()));
}

TEST(Data, HeldOutOffsetStartsAtALine) {
  EXPECT_EQ(heldout_offset("abcd\nefgh\nij", 0), 12u);
  EXPECT_EQ(heldout_offset("abcd\nefgh\nij", 0.5), 10u);  // byte 6 is inside "efgh": the next line
  EXPECT_EQ(heldout_offset("abcd\nefgh", 0.5), 5u);        // byte 4 is the newline
  // No line after the cut: the next UTF-8 character boundary ("é" is 2 bytes at 3..4).
  EXPECT_EQ(heldout_offset("abcé", 0.2), 5u);
  EXPECT_THROW(heldout_offset("abc", 1.0), std::invalid_argument);
  // A file whose held-out tail is empty is an error naming the file, not a perplexity of nothing.
  test::TempDir tmp;
  write_file_atomic(tmp / "short.txt", "abc\n");
  try {
    read_heldout_text(tmp / "short.txt", 0.1);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("short.txt: nothing left to score"), std::string::npos) << e.what();
  }
}

TEST(Data, TextWindowsAndHeldOutTail) {
  test::TempDir tmp;
  const std::string line = "Once upon a time there was a cat.\n";  // 34 bytes
  std::string text;
  for (int i = 0; i < 200; ++i) text += line;
  write_file_atomic(tmp / "t.txt", text);
  auto tok = load_tokenizer(test::asset("models/stories260K/tok512.bin"), 512);
  DataOptions o;
  o.seq_len = 32;
  o.val_fraction = 0.25;
  Dataset d = load_dataset(tmp / "t.txt", *tok, o);
  // 0.75 * 6800 bytes = 5100 = the start of line 151: the first 150 lines train, the last 50
  // are held out, each part tokenized on its own with BOS.
  std::string head, tail;
  for (int i = 0; i < 150; ++i) head += line;
  for (int i = 0; i < 50; ++i) tail += line;
  std::vector<int> ht = tok->encode(head, true, false), tt = tok->encode(tail, true, false);
  EXPECT_EQ(d.train.size(), (ht.size() - 1 + 31) / 32);
  EXPECT_EQ(d.val.size(), (tt.size() - 1 + 31) / 32);
  // Window 0: inputs ht[0, 32), targets ht[1, 33).
  EXPECT_EQ(d.train[0].tokens, std::vector<int>(ht.begin(), ht.begin() + 32));
  EXPECT_EQ(d.train[0].labels, std::vector<int>(ht.begin() + 1, ht.begin() + 33));
  EXPECT_EQ(d.val[0].tokens, std::vector<int>(tt.begin(), tt.begin() + 32));
  EXPECT_EQ(d.val.back().labels.back(), tt.back());
  EXPECT_EQ(read_heldout_text(tmp / "t.txt", 0.25), tail);
  EXPECT_EQ(read_heldout_text(tmp / "t.txt", 0), text);  // nothing held out: the whole file
  // Epoch orders: permutations, reproducible, different per epoch.
  auto a = epoch_order(50, 7, 0), b = epoch_order(50, 7, 0), c = epoch_order(50, 7, 1);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::sort(c.begin(), c.end());
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(c[i], i);
}

TEST(Data, MixtureHoldsOutEachFileOnItsOwn) {
  test::TempDir tmp;
  std::string jsonl;
  const std::vector<std::string> outputs = {"Hi", "Bye", "Yes", "No"};
  for (const auto& out : outputs) jsonl += R"({"instruction": "Answer.", "input": "", "output": ")" + out + "\"}\n";
  write_file_atomic(tmp / "a.jsonl", jsonl);
  const std::string line = "Once upon a time there was a cat.\n";
  std::string text;
  for (int i = 0; i < 120; ++i) text += line;
  write_file_atomic(tmp / "t.txt", text);
  auto tok = load_tokenizer(test::asset("models/stories260K/tok512.bin"), 512);
  DataOptions o;
  o.seq_len = 128;  // longer than the Alpaca prompt
  o.val_fraction = 0.25;
  const Dataset d = load_datasets({tmp / "a.jsonl", tmp / "t.txt"}, *tok, o);
  // The Alpaca file's last quarter (one example) and the text's last quarter (30 lines) are
  // held out, each as if it were trained on alone; the training part of each comes first in
  // the order given.
  const std::string prompt = alpaca_prompt("Answer.", "");
  auto alpaca_inputs = [&](const std::string& out) {
    std::vector<int> full = tok->encode(prompt + out, true, true);
    return std::vector<int>(full.begin(), full.end() - 1);
  };
  std::string head, tail;
  for (int i = 0; i < 90; ++i) head += line;
  for (int i = 0; i < 30; ++i) tail += line;
  const std::vector<int> ht = tok->encode(head, true, false), tt = tok->encode(tail, true, false);
  const size_t head_windows = (ht.size() - 1 + 127) / 128, tail_windows = (tt.size() - 1 + 127) / 128;
  ASSERT_EQ(d.train.size(), 3 + head_windows);
  ASSERT_EQ(d.val.size(), 1 + tail_windows);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(d.train[i].tokens, alpaca_inputs(outputs[i])) << i;
  EXPECT_EQ(d.val[0].tokens, alpaca_inputs("No"));
  EXPECT_EQ(d.train[3].tokens, std::vector<int>(ht.begin(), ht.begin() + 128));
  EXPECT_EQ(d.train[3].labels, std::vector<int>(ht.begin() + 1, ht.begin() + 129));  // every token scored
  EXPECT_EQ(d.val.back().labels.back(), tt.back());
  EXPECT_EQ(d.kind, "alpaca + text");
  // The mixture's identity (checked on --resume) depends on the files and their order; one file
  // is that file's dataset.
  EXPECT_NE(d.digest, load_datasets({tmp / "t.txt", tmp / "a.jsonl"}, *tok, o).digest);
  EXPECT_EQ(load_datasets({tmp / "t.txt"}, *tok, o).digest, load_dataset(tmp / "t.txt", *tok, o).digest);
  // A missing second file is named.
  try {
    load_datasets({tmp / "a.jsonl", tmp / "missing.json"}, *tok, o);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("missing.json: data file not found"), std::string::npos) << e.what();
  }
}

TEST(Schedule, WarmupThenCosine) {
  TrainOptions o;
  o.lr = 1.0;
  o.min_lr_ratio = 0.1;
  o.warmup = 4;
  EXPECT_DOUBLE_EQ(learning_rate(o, 0, 14), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(o, 3, 14), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(o, 4, 14), 1.0);                  // cosine starts at the peak
  EXPECT_NEAR(learning_rate(o, 9, 14), 0.1 + 0.9 * 0.5, 1e-12);   // halfway
  EXPECT_NEAR(learning_rate(o, 14, 14), 0.1, 1e-12);
}

TEST(Plan, RulesSelectSkipAndOverride) {
  LoadedModel m = load_model(test::asset(kStories));
  ClusteringPlan p;
  EXPECT_EQ(p.resolve(m.model).size(), 35u);  // 7 projections x 5 layers
  p.apply_json(nlohmann::json::parse(R"({
    "bits": 2,
    "rules": [
      {"pattern": "model\\.layers\\.0\\..*", "skip": true},
      {"pattern": ".*mlp\\.down_proj.*", "bits": 4, "group_size": 16},
      {"pattern": "model\\.embed_tokens\\.weight", "bits": 6}
    ]})"), "plan.json");
  auto r = p.resolve(m.model);
  EXPECT_EQ(r.size(), 28u + 1u);
  for (const auto& [name, cfg] : r) {
    EXPECT_EQ(name.find("layers.0."), std::string::npos);
    const bool down = name.find("down_proj") != std::string::npos;
    EXPECT_EQ(cfg.bits, down ? 4 : name == "model.embed_tokens.weight" ? 6 : 2) << name;
    EXPECT_EQ(cfg.group_size, down ? 16 : 0) << name;
  }
  ClusteringPlan none;
  none.apply_json(nlohmann::json::parse(R"({"rules": [{"pattern": ".*", "skip": true}]})"), "none.json");
  EXPECT_THROW(none.resolve(m.model), InputError);
  ClusteringPlan bad;
  EXPECT_THROW(bad.apply_json(nlohmann::json::parse(R"({"bits": 9})"), "b.json"), InputError);
  EXPECT_THROW(bad.apply_json(nlohmann::json::parse(R"({"bitz": 3})"), "b.json"), InputError);
  EXPECT_THROW(bad.apply_json(nlohmann::json::parse(R"({"rules": [{"pattern": "(["}]})"), "b.json"), InputError);
}

CompressOptions small_run(const test::TempDir& tmp, const std::string& out) {
  CompressOptions o;
  o.data_paths = {test::asset("eval/tinystories/val_a.txt")};
  o.out = tmp / out;
  o.plan.defaults.bits = 3;
  o.data.seq_len = 64;
  o.data.val_fraction = 0.02;
  o.train.steps = 6;
  o.train.batch = 4;
  o.train.grad_accum = 2;
  o.train.lr = 1e-3;
  o.train.warmup = 2;
  o.train.quiet = true;
  o.train.checkpoint_path = tmp / (out + ".ckpt");
  return o;
}

// Every DKM setting a JSON config sets lands in its own field of DKMConfig and is written back
// under the same name (JSON in and out walk one table); each range is enforced.
TEST(Plan, EveryDkmSettingReadsAndWritesUnderItsName) {
  const nlohmann::json j = {{"bits", 5},          {"cluster_dim", 2},       {"tau", 3e-4},
                            {"max_iters", 7},     {"eps", 1e-3},            {"group_size", 16},
                            {"per_row_scale", true}, {"cluster_dtype", "fp16"}, {"init", "quantile"},
                            {"seed", 9},          {"method", "edkm"},       {"zero_threshold", 1e-6},
                            {"prune_threshold", 0.5}, {"kmeans_max_iters", 20}, {"marshal", true},
                            {"uniquify", true},   {"shard", true}};
  DKMConfig c;
  apply_dkm_json(c, j, "all.json");
  EXPECT_EQ(c.bits, 5);
  EXPECT_EQ(c.cluster_dim, 2);
  EXPECT_EQ(c.tau, 3e-4);
  EXPECT_EQ(c.max_iters, 7);
  EXPECT_EQ(c.eps, 1e-3);
  EXPECT_EQ(c.group_size, 16);
  EXPECT_TRUE(c.per_row_scale);
  EXPECT_EQ(c.cluster_dtype, ClusterDType::kFloat16);
  EXPECT_EQ(c.init, PaletteInit::kQuantile);
  EXPECT_EQ(c.seed, 9u);
  EXPECT_EQ(c.method, DKMMethod::kEDKM);
  EXPECT_EQ(c.zero_threshold, 1e-6);
  EXPECT_EQ(c.prune_threshold, 0.5);
  EXPECT_EQ(c.kmeans_max_iters, 20);
  EXPECT_TRUE(c.marshal && c.uniquify && c.shard);
  EXPECT_EQ(dkm_to_json(c), j);
  EXPECT_EQ(dkm_to_json(DKMConfig{}).size(), j.size());
  for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"bits", 0}, {"bits", 9}, {"tau", 0.0}, {"max_iters", 0}, {"eps", -1.0}, {"group_size", -1},
           {"zero_threshold", 1.0}, {"prune_threshold", -0.1}, {"kmeans_max_iters", -1}, {"cluster_dim", 0},
           {"seed", -1}, {"cluster_dtype", "fp8"}, {"bits", 3.5}, {"shard", 1}, {"nonsense", 1}}) {
    DKMConfig d;
    EXPECT_THROW(apply_dkm_json(d, {{key, value}}, "bad.json"), InputError) << key << " " << value.dump();
  }
}

TEST(Compress, InterruptedAndResumedRunEqualsUninterrupted) {
  test::TempDir tmp;
  LoadedModel a = load_model(test::asset(kStories));
  CompressReport full = compress(a, small_run(tmp, "full.edkm"));
  ASSERT_FALSE(full.train.interrupted);
  ASSERT_EQ(full.train.losses.size(), 6u);

  LoadedModel b = load_model(test::asset(kStories));
  CompressOptions o = small_run(tmp, "split.edkm");
  int calls = 0;
  o.train.should_stop = [&] { return ++calls == 3; };  // "Ctrl-C" during step 3
  CompressReport first = compress(b, o);
  ASSERT_TRUE(first.train.interrupted);
  EXPECT_EQ(first.train.steps_done, 3);
  EXPECT_FALSE(std::filesystem::exists(tmp / "split.edkm"));  // nothing written but the checkpoint

  // Resuming with different settings is refused, naming the setting that differs.
  o.train.should_stop = nullptr;
  o.train.resume = true;
  {
    LoadedModel d = load_model(test::asset(kStories));
    CompressOptions changed = o;
    changed.train.lr = 5e-4;
    try {
      compress(d, changed);
      ADD_FAILURE() << "resumed with another learning rate";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("lr: 0.001 -> 0.0005"), std::string::npos) << e.what();
    }
  }

  LoadedModel c = load_model(test::asset(kStories));
  CompressReport second = compress(c, o);
  ASSERT_EQ(second.train.start_step, 3);
  ASSERT_EQ(second.train.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(first.train.losses[i], full.train.losses[i]);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(second.train.losses[i], full.train.losses[3 + i]);
  // Bitwise the same model: same thread count, same data order, same palettes.
  CompressedModel x = read_compressed(tmp / "full.edkm"), y = read_compressed(tmp / "split.edkm");
  for (const auto& [name, t] : x.dense) EXPECT_TRUE(at::equal(t, y.dense.at(name))) << name;
  for (const auto& [name, p] : x.packed) {
    EXPECT_TRUE(at::equal(p.indices, y.packed.at(name).indices)) << name;
    EXPECT_TRUE(at::equal(p.palette, y.packed.at(name).palette)) << name;
  }
  EXPECT_EQ(full.val_exported, second.val_exported);
  // A finished run's checkpoint could only repeat it: it is gone.
  EXPECT_FALSE(std::filesystem::exists(o.train.checkpoint_path));
}

TEST(Compress, AlpacaEndToEnd) {
  test::TempDir tmp;
  LoadedModel m = load_model(test::asset(kStories));
  CompressOptions o = small_run(tmp, "alpaca.edkm");
  o.data_paths = {test::asset("finetune/alpaca_small_2000.json")};
  o.data.seq_len = 256;  // the 512-token vocabulary spends ~100 tokens on the prompt alone
  o.data.val_fraction = 0.05;
  o.train.steps = 4;
  CompressReport r = compress(m, o);
  EXPECT_EQ(r.train_examples + r.val_examples + r.dropped, 2000);
  EXPECT_LT(r.dropped, 100);
  EXPECT_GT(r.train_tokens, 10000);
  EXPECT_TRUE(std::isfinite(r.val_exported));
  EXPECT_EQ(r.clustered, 35);
  CompressedModel back = read_compressed(tmp / "alpaca.edkm");
  EXPECT_EQ(back.packed.size(), 35u);
  EXPECT_EQ(back.packed.begin()->second.bits, 3);
  EXPECT_NEAR(r.size.clustered_bits_per_weight(), 3.0, 0.1);
}

TEST(Compress, BadInputIsReportedAndWritesNothing) {
  test::TempDir tmp;
  const std::string model = test::asset(kStories);
  const std::string base = "compress -t 1 -q --steps 1 --seq-len 32 -m " + model;
  auto expect_fails = [&](const std::string& args, const std::string& message) {
    auto [code, out, err] = test::run_cli(base + " " + args + " -o " + tmp / "out.edkm", tmp);
    EXPECT_EQ(code, 1) << args << "\n" << err;
    EXPECT_NE(err.find(message), std::string::npos) << args << "\n" << err;
    EXPECT_FALSE(std::filesystem::exists(tmp / "out.edkm")) << args;
  };
  expect_fails("-d " + tmp / "missing.txt", "missing.txt: data file not found");
  write_file_atomic(tmp / "empty.txt", "  \n\n");
  expect_fails("-d " + tmp / "empty.txt", "empty.txt: the data file is empty");
  write_file_atomic(tmp / "long.jsonl", R"({"instruction": ")" + std::string(400, 'x') + R"(", "input": "", "output": "y"})" "\n");
  expect_fails("-d " + tmp / "long.jsonl", "longer than --seq-len 32");
  write_file_atomic(tmp / "bad.jsonl", "{\"instruction\": 1}\n");
  expect_fails("-d " + tmp / "bad.jsonl", "bad.jsonl: example 1");
  write_file_atomic(tmp / "none.json", R"({"rules": [{"pattern": ".*", "skip": true}]})");
  const std::string text = test::asset("eval/tinystories/val_a.txt");
  expect_fails("-d " + text + " --config " + tmp / "none.json", "selects no weights");
  write_file_atomic(tmp / "bits.json", R"({"bits": 12})");
  expect_fails("-d " + text + " --config " + tmp / "bits.json", "bits must be in 1..8");
  {
    auto [code, out, err] = test::run_cli(base + " -d " + text + " --bits 0 -o " + tmp / "out.edkm", tmp);
    EXPECT_NE(code, 0);
  }
  auto [code, out, err] = test::run_cli(base + " -d " + text + " -o /nonexistent/dir/out.edkm", tmp);
  EXPECT_EQ(code, 1);
  EXPECT_NE(err.find("/nonexistent/dir/out.edkm: directory /nonexistent/dir does not exist"), std::string::npos) << err;
  expect_fails("-d " + text + " --resume", "no checkpoint to resume from");
  // Mixed precision is a GPU mode; on a CPU it is refused rather than silently ignored.
  expect_fails("-d " + text + " --device cpu --autocast bf16", "--autocast bf16 needs a GPU");
}

TEST(BenchStep, ReportsTheStepWithDkmWithoutAndWithTheBaselines) {
  // A tiny LLaMA-shaped model on the CPU: the GPU run (scripts/gpu-check.sh) uses 8 of
  // LLaMA-7B's layers. DKM keeps a soft copy of every projection and its gradient: more memory.
  test::TempDir tmp;
  auto [code, out, err] = test::run_cli(
      "bench step -t 1 --json --layers 2 --dim 64 --hidden 160 --heads 4 --vocab 256 --seq-len 32 --steps 1", tmp);
  ASSERT_EQ(code, 0) << err;
  const nlohmann::json j = nlohmann::json::parse(out);
  ASSERT_EQ(j["rows"].size(), 4u);
  EXPECT_EQ(j["rows"][0]["mode"], "fine-tune");
  EXPECT_EQ(j["rows"][1]["mode"], "DKM 3-bit");
  EXPECT_EQ(j["rows"][2]["mode"], "hard k-means 3-bit");
  EXPECT_EQ(j["rows"][3]["mode"], "QAT 3-bit");
  // 2 layers x (4 x 64^2 + 3 x 64 x 160) + 2 x 256 x 64 + norms.
  EXPECT_EQ(j["parameters"].get<int64_t>(), 2 * (4 * 64 * 64 + 3 * 64 * 160 + 2 * 64) + 2 * 256 * 64 + 64);
  const double fp32_params = 4.0 * j["parameters"].get<double>();
  // Weights, gradients and AdamW's two moments at least.
  EXPECT_GT(j["rows"][0]["peak_tensor_bytes"].get<double>(), 4 * fp32_params);
  EXPECT_GT(j["dkm_over_finetune_memory"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(j["rows"][1]["memory_over_finetune"].get<double>(), j["dkm_over_finetune_memory"].get<double>());
  for (int i = 1; i < 4; ++i) EXPECT_GT(j["rows"][i]["seconds_per_step"].get<double>(), 0.0) << i;
  // QAT's learned scale and zero point are two more rows per weight matrix, with AdamW state.
  EXPECT_GT(j["rows"][3]["peak_tensor_bytes"].get<double>(), j["rows"][0]["peak_tensor_bytes"].get<double>());
}

}  // namespace
}  // namespace edkm
