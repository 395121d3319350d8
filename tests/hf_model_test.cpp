// The LLaMA family as Hugging Face builds it, against transformers itself: for each tiny random
// model in tests/fixtures/hf/ (made by make_hf_fixtures.py with transformers' own classes),
// edkm's fp32 logits match the logits transformers computed, its tokenizer matches the ids the
// fixture's tokenizer.json gave, and each model goes through the whole pipeline (DKM training,
// the compressed file, the packed runtime, export).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <filesystem>
#include <string>

#include "common/atomic_file.h"
#include "common/error.h"
#include "format/format.h"
#include "model/io/hf.h"
#include "model/io/safetensors.h"
#include "pipeline/compress.h"
#include "pipeline/load.h"
#include "runtime/lut_kernel.h"
#include "test_util.h"

namespace edkm {
namespace {

namespace fs = std::filesystem;

const char* const kFamilies[] = {"llama3", "llama3_2", "llama2", "mistral", "qwen2", "qwen3", "smollm2"};
// The prompts make_hf_fixtures.py encoded at the start of each row of tokens.
const char* const kPrompts[] = {"Once upon a time, a little fox found a shiny stone by the river. She",
                                "Tom and his dog played in the park until the sun went down and the"};

std::string fixture(const std::string& family) { return std::string(EDKM_FIXTURES) + "/hf/" + family; }

struct Reference {
  at::Tensor tokens, logits;  // [2, 24] int64, [2, 24, vocab] fp32 from transformers
};

Reference reference(const std::string& family) {
  safetensors::File f(fixture(family) + "/logits.safetensors");
  return {f.tensor("tokens").clone(), f.tensor("logits").clone()};
}

// The test's bound: |a - b| relative to the largest reference logit of the same position, max
// over positions (make_hf_fixtures.py measures the same).
double max_rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).abs().amax(-1) / y.abs().amax(-1)).max().item<double>();
}

class HfFamily : public ::testing::TestWithParam<const char*> {};

TEST_P(HfFamily, LogitsMatchTransformers) {
  LoadedModel m = load_model(fixture(GetParam()));
  Reference ref = reference(GetParam());
  at::NoGradGuard ng;
  at::Tensor logits = m.model.forward(ref.tokens);
  EXPECT_LT(max_rel_err(logits, ref.logits), 1e-4);
  // Incremental decoding, a token at a time through the KV cache (past Mistral's window of 8).
  KVCache cache = m.model.new_cache(2, 24);
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < 24; ++t) steps.push_back(m.model.forward(ref.tokens.narrow(1, t, 1), cache));
  EXPECT_LT(max_rel_err(at::cat(steps, 1), ref.logits), 1e-4);
}

TEST_P(HfFamily, TokenizerMatchesTokenizersAndRoundTrips) {
  LoadedModel m = load_model(fixture(GetParam()));
  ASSERT_TRUE(m.tokenizer);
  ASSERT_EQ(m.tokenizer->kind(), Tokenizer::Kind::kHuggingFace);
  Reference ref = reference(GetParam());
  for (int row = 0; row < 2; ++row) {
    std::vector<int> ids = m.tokenizer->encode(kPrompts[row], /*bos=*/true, /*eos=*/false);
    const int64_t n = std::min<int64_t>(ids.size(), 24);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(ids[i], ref.tokens[row][i].item<int64_t>()) << row << ":" << i;
    EXPECT_EQ(m.tokenizer->decode(ids), kPrompts[row]);
  }
  EXPECT_GE(m.tokenizer->eos_id(), 0);  // from tokenizer_config.json
}

TEST_P(HfFamily, GradientCheckpointingGivesTheSameGradients) {
  LoadedModel m = load_model(fixture(GetParam()));
  Reference ref = reference(GetParam());
  std::vector<at::Tensor> leaves;
  WeightOverrides ov;
  for (const auto& [name, t] : m.model.weights()) {
    ov[name] = t.detach().clone().requires_grad_(true);
    leaves.push_back(ov[name]);
  }
  auto grads = [&](bool checkpoint) {
    ForwardOptions o{&ov, checkpoint};
    at::Tensor logits = m.model.forward(ref.tokens.narrow(1, 0, 23), o);
    at::Tensor loss = next_token_loss(logits, ref.tokens.narrow(1, 1, 23));
    return torch::autograd::grad({loss}, leaves);
  };
  auto plain = grads(false), checkpointed = grads(true);
  for (size_t i = 0; i < leaves.size(); ++i) {
    ASSERT_TRUE(checkpointed[i].defined());
    EXPECT_LT(test::rel_err(checkpointed[i], plain[i]), 1e-5) << i;
  }
}

// Load, DKM fine-tuning, the compressed file (config and tokenizer inside), the packed runtime,
// and the exported Hugging Face directory, which edkm reloads with the same config and logits.
TEST_P(HfFamily, CompressRunsTheWholePipeline) {
  test::TempDir tmp;
  LoadedModel m = load_model(fixture(GetParam()));
  const nlohmann::json config = m.model.config().to_hf();
  CompressOptions o;
  o.data_paths = {test::asset("eval/tinystories/val_a.txt")};
  o.out = tmp / "m.edkm";
  o.plan.defaults.bits = 4;
  o.data.seq_len = 24;
  o.data.val_fraction = 0.01;
  o.train.steps = 2;
  o.train.batch = 2;
  o.train.warmup = 1;
  o.train.quiet = true;
  CompressReport r = compress(m, o);
  EXPECT_GT(r.clustered, 0);
  EXPECT_TRUE(std::isfinite(r.val_exported));

  LoadedModel packed = load_model(tmp / "m.edkm");
  EXPECT_EQ(packed.model.config().to_hf(), config);
  ASSERT_TRUE(packed.tokenizer);
  EXPECT_EQ(packed.tokenizer->eos_id(), m.tokenizer->eos_id());  // the EOS travels in the file
  EXPECT_EQ(packed.tokenizer->encode(kPrompts[0], true, true), m.tokenizer->encode(kPrompts[0], true, true));

  const CompressedModel c = read_compressed(tmp / "m.edkm");
  save_hf_dir(c.to_llama(at::kFloat), tmp / "export", at::kFloat, c.tokenizer().get());
  LoadedModel exported = load_model(tmp / "export");
  EXPECT_EQ(exported.model.config().to_hf(), config);
  EXPECT_EQ(exported.tokenizer->eos_id(), m.tokenizer->eos_id());
  Reference ref = reference(GetParam());
  at::NoGradGuard ng;
  EXPECT_LT(max_rel_err(packed.model.forward(ref.tokens), exported.model.forward(ref.tokens)), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfFamily, ::testing::ValuesIn(kFamilies),
                         [](const auto& info) { return std::string(info.param); });

// The same architecture from transformers 4's keys (rope_theta, rope_scaling with "type") as
// from transformers 5's rope_parameters; and the fields each family implies.
TEST(HfConfig, ReadsBothRopeFormsAndEachFamilysFields) {
  nlohmann::json v5 = nlohmann::json::parse(read_file(fixture("llama3") + "/config.json"));
  nlohmann::json v4 = v5;
  v4.erase("rope_parameters");
  v4["rope_theta"] = 500000.0;
  v4["rope_scaling"] = {{"type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const LlamaConfig a = LlamaConfig::from_hf(v5, "v5"), b = LlamaConfig::from_hf(v4, "v4");
  EXPECT_EQ(a.to_hf(), b.to_hf());
  EXPECT_EQ(a.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(a.rope_scaling.original_max_seq_len, 8192);
  EXPECT_EQ(LlamaConfig::from_hf(a.to_hf(), "round trip").to_hf(), a.to_hf());

  auto cfg = [](const char* family) { return load_model(fixture(family)).model.config(); };
  EXPECT_TRUE(cfg("qwen2").qkv_bias && !cfg("qwen2").o_bias && cfg("qwen2").tie_embeddings);
  EXPECT_TRUE(cfg("qwen3").qk_norm && cfg("qwen3").head_dim() == 32 && cfg("qwen3").q_dim() == 128);
  EXPECT_EQ(cfg("mistral").sliding_window, 8);
  EXPECT_EQ(cfg("mistral").head_dim(), 24);
  EXPECT_TRUE(cfg("llama2").o_bias && cfg("llama2").mlp_bias);
  EXPECT_EQ(cfg("llama2").rope_scaling.type, RopeScaling::Type::kLinear);
}

// Each refusal names the file and the field.
TEST(HfConfig, RefusesWhatTheForwardPassDoesNotImplement) {
  const nlohmann::json base = nlohmann::json::parse(read_file(fixture("qwen3") + "/config.json"));
  auto refused = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& expected) {
    nlohmann::json j = base;
    edit(j);
    try {
      LlamaConfig::from_hf(j, "dir/config.json");
      ADD_FAILURE() << "accepted; expected an error containing '" << expected << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("dir/config.json"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  refused([](auto& j) { j["model_type"] = "gemma2"; }, "model_type 'gemma2' is not supported");
  refused([](auto& j) { j["rope_parameters"]["rope_type"] = "yarn"; }, "rope_parameters.rope_type 'yarn'");
  refused([](auto& j) { j["rope_parameters"]["partial_rotary_factor"] = 0.5; }, "partial_rotary_factor");
  refused([](auto& j) { j["use_sliding_window"] = true; }, "use_sliding_window");
  refused([](auto& j) { j["layer_types"][1] = "sliding_attention"; }, "layer_types");
  refused([](auto& j) { j["hidden_act"] = "gelu"; }, "hidden_act 'gelu'");
  refused([](auto& j) { j["head_dim"] = "32"; }, "'head_dim' must be an integer");
  refused(
      [](auto& j) {
        j.erase("rope_parameters");
        j["rope_scaling"] = {{"rope_type", "linear"}};
      },
      "missing config field 'rope_scaling.factor'");
  refused([](auto& j) { j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 1e4}, {"factor", 8}}; },
          "rope_parameters.low_freq_factor");
}

// Through the CLI: an unsupported field is exit 1 with the file and field named, and a model that
// a llama2.c checkpoint cannot hold is refused without writing one.
TEST(HfConfig, CliRefusalsNameTheFileAndWriteNothing) {
  test::TempDir tmp;
  const std::string dir = tmp / "model";
  fs::copy(fixture("qwen3"), dir);
  nlohmann::json cj = nlohmann::json::parse(read_file(dir + "/config.json"));
  cj["rope_parameters"]["rope_type"] = "yarn";
  write_file_atomic(dir + "/config.json", cj.dump());
  test::CliResult r = test::run_cli("convert -m " + dir + " -o " + (tmp / "out"), tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(dir + "/config.json: rope_parameters.rope_type 'yarn' is not supported"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp / "out"));

  r = test::run_cli("convert -m " + fixture("qwen2") + " --format llama2c -o " + (tmp / "q.bin"), tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("a llama2.c checkpoint cannot hold this qwen2 model"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp / "q.bin"));
}

// A tokenizer with fewer tokens than the embedding has rows (Qwen pads 151,669 to 151,936) loads;
// one with more does not.
TEST(HfConfig, TokenizerMayBeSmallerThanTheEmbedding) {
  test::TempDir tmp;
  LoadedModel m = load_model(fixture("qwen2"));
  for (int64_t vocab : {512, 300}) {
    const std::string dir = tmp / ("v" + std::to_string(vocab));
    fs::create_directories(dir);
    LlamaConfig c = m.model.config();
    c.vocab_size = vocab;
    Llama big = Llama::random(c, at::kFloat, 1);
    save_hf_dir(big, dir, at::kFloat, m.tokenizer.get());
    if (vocab > m.tokenizer->vocab_size()) {
      EXPECT_NO_THROW(load_model(dir));
    } else {
      EXPECT_THROW(load_model(dir), InputError);
    }
  }
}

}  // namespace
}  // namespace edkm
