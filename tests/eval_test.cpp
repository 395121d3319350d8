// Zero-shot evaluation: the readers on the real files, the harness's request construction,
// log-likelihoods against a direct computation, and the scoring against hand-computed values.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"
#include "eval/harness.h"
#include "eval/report.h"
#include "eval/tasks.h"
#include "pipeline/load.h"
#include "test_util.h"

namespace edkm {
namespace {

TEST(Tasks, RealFilesHaveTheExpectedItems) {
  const std::string a = test::assets_dir();
  const std::map<std::string, size_t> counts = {{"piqa", 1838}, {"winogrande", 1267}, {"hellaswag", 10042},
                                                {"arc_easy", 2376}, {"arc_challenge", 299}, {"boolq", 3270}, {"copa", 100}};
  for (const auto& [name, n] : counts) EXPECT_EQ(load_task(name, a).items.size(), n) << name;

  Task piqa = load_task("piqa", a);
  EXPECT_EQ(piqa.items[0].choices[0].context, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:");
  EXPECT_EQ(piqa.items[0].choices[1].continuation.substr(0, 30), " Provide the guinea pig with a");
  EXPECT_EQ(piqa.items[0].gold, 0);
  EXPECT_EQ(piqa.items[1].gold, 1);

  // Partial evaluation: the option completes the context; the rest of the sentence is shared.
  Task wg = load_task("winogrande", a);
  EXPECT_EQ(wg.items[0].choices[0].context, "Sarah was a much better surgeon than Maria so Sarah");
  EXPECT_EQ(wg.items[0].choices[1].context, "Sarah was a much better surgeon than Maria so Maria");
  EXPECT_EQ(wg.items[0].choices[0].continuation, " always got the easier cases.");
  EXPECT_EQ(wg.items[0].choices[1].continuation, " always got the easier cases.");
  EXPECT_EQ(wg.items[0].gold, 1);

  Task copa = load_task("copa", a);  // "The man turned on the faucet." / effect
  EXPECT_EQ(copa.items[0].choices[0].context, "The man turned on the faucet therefore");
  // lm-eval's super_glue/copa/utils.py doc_to_choice returns " " + choice, and construct_requests
  // prepends the target delimiter " ": two spaces.
  EXPECT_EQ(copa.items[0].choices[0].continuation, "  the toilet filled with water.");
  EXPECT_EQ(copa.items[0].choices[1].continuation, "  water flowed from the spout.");
  EXPECT_EQ(copa.items[0].gold, 1);

  Task hs = load_task("hellaswag", a);
  EXPECT_EQ(hs.items[0].choices[0].context, "Roof shingle removal: A man is sitting on a roof. he");
  EXPECT_EQ(hs.items[0].choices[3].continuation, " starts pulling up roofing on a roof.");
  EXPECT_EQ(hs.items[0].gold, 3);

  Task boolq = load_task("boolq", a);
  EXPECT_EQ(boolq.items[0].choices[0].continuation, " no");
  EXPECT_EQ(boolq.items[0].choices[1].continuation, " yes");
  EXPECT_EQ(boolq.items[0].gold, 0);  // "false"
  EXPECT_NE(boolq.items[0].choices[0].context.find("\nQuestion: does ethanol take more energy make that produces?\nAnswer:"),
            std::string::npos);

  Task arc = load_task("arc_easy", a);
  EXPECT_EQ(arc.items[0].choices[0].context,
            "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:");
  EXPECT_EQ(arc.items[0].gold, 0);  // answerKey "A"
  EXPECT_TRUE(arc.acc_norm);
  EXPECT_FALSE(boolq.acc_norm);
}

TEST(Tasks, MalformedFilesNameTheLine) {
  test::TempDir tmp;
  write_file_atomic(tmp / "c.jsonl", "{\"premise\": \"A.\", \"choice1\": \"b\", \"choice2\": \"c\", \"question\": \"cause\", \"label\": 0}\n"
                                     "{\"premise\": \"A.\", \"choice1\": \"b\"\n");
  try {
    read_copa(tmp / "c.jsonl");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("c.jsonl:2: malformed line"), std::string::npos) << e.what();
  }
  write_file_atomic(tmp / "w.jsonl", "{\"sentence\": \"no blank\", \"option1\": \"a\", \"option2\": \"b\", \"answer\": \"1\"}\n");
  EXPECT_THROW(read_winogrande(tmp / "w.jsonl"), InputError);
  write_file_atomic(tmp / "a.jsonl", R"({"question": {"stem": "q", "choices": [{"text": "x", "label": "A"}]}, "answerKey": "B"})" "\n");
  try {
    read_arc(tmp / "a.jsonl", "arc");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("a.jsonl:1: answerKey 'B'"), std::string::npos) << e.what();
  }
  write_file_atomic(tmp / "h.txt", "ctx\n7\na\nb\nc\nd\n");
  EXPECT_THROW(read_hellaswag(tmp / "h.txt"), InputError);
  write_file_atomic(tmp / "p.jsonl", R"({"goal": "g", "sol1": "a", "sol2": "b"})" "\n");
  write_file_atomic(tmp / "p.lst", "0\n1\n");
  EXPECT_THROW(read_piqa(tmp / "p.jsonl", tmp / "p.lst"), InputError);
  EXPECT_THROW(load_task("mmlu", test::assets_dir()), std::invalid_argument);
}

TEST(Harness, RequestTokenizationMovesTrailingSpaces) {
  auto tok = load_tokenizer(test::asset("models/stories260K/tok512.bin"), 512);
  auto [c1, k1] = encode_pair(*tok, "Once upon a ", "time");
  auto [c2, k2] = encode_pair(*tok, "Once upon a", " time");
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(k1, k2);
  std::vector<int> whole = tok->encode("Once upon a time", true, false);
  c1.insert(c1.end(), k1.begin(), k1.end());
  EXPECT_EQ(c1, whole);
  EXPECT_EQ(c2.front(), tok->bos_id());
}

// An independent reference: the log-likelihood from one plain forward pass of the whole
// sequence, one request at a time.
double reference_ll(const Llama& m, const Tokenizer& tok, const Choice& r) {
  std::vector<int> whole = tok.encode(r.context + r.continuation, true, false);
  const size_t n_ctx = tok.encode(r.context, true, false).size();
  at::Tensor x = at::tensor(std::vector<int64_t>(whole.begin(), whole.end() - 1), at::kLong).view({1, -1});
  at::Tensor lp = at::log_softmax(m.forward(x)[0].to(at::kDouble), -1);
  double ll = 0;
  for (size_t t = n_ctx; t < whole.size(); ++t) ll += lp[t - 1][whole[t]].item<double>();
  return ll;
}

TEST(Harness, LogLikelihoodsMatchDirectComputationForEveryTaskType) {
  LoadedModel m = load_model(test::asset("models/stories260K/stories260K.bin"));
  const std::string a = test::assets_dir();
  at::NoGradGuard g;
  for (const auto& name : task_names()) {
    Task t = load_task(name, a);
    t.items.resize(3);
    std::vector<Choice> reqs;
    for (const auto& it : t.items) reqs.insert(reqs.end(), it.choices.begin(), it.choices.end());
    EvalOptions o;
    o.batch = 4;  // mixed lengths in a batch: padding and sorting are exercised
    const std::vector<Response> resps = loglikelihoods(m.model, *m.tokenizer, reqs, o);
    std::vector<double> ll;
    for (const auto& r : resps) ll.push_back(r.loglikelihood);
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (m.tokenizer->encode(reqs[i].context + reqs[i].continuation, true, false).size() > 512) continue;  // truncated
      EXPECT_NEAR(ll[i], reference_ll(m.model, *m.tokenizer, reqs[i]), 1e-3) << name << " request " << i;
    }
    // And the task's accuracy is the one its log-likelihoods imply.
    TaskResult r = score_task(t, ll);
    int correct = 0;
    size_t k = 0;
    for (const auto& it : t.items) {
      const size_t best = std::max_element(ll.begin() + k, ll.begin() + k + it.choices.size()) - (ll.begin() + k);
      correct += static_cast<int>(best) == it.gold;
      k += it.choices.size();
    }
    EXPECT_DOUBLE_EQ(r.acc, correct / 3.0) << name;
  }
}

// Two lines of text: --heldout 0.5 keeps the second.
const std::string kHead = "Once upon a time, there was a little girl named Lily.\n";
const std::string kTail = "She liked to play with her ball in the park.\n";

// --heldout 0.5 on two lines scores the second line alone: its NLL from one plain forward pass.
TEST(Harness, HeldOutPerplexityScoresOnlyTheTail) {
  LoadedModel m = load_model(test::asset("models/stories260K/stories260K.bin"));
  test::TempDir tmp;
  write_file_atomic(tmp / "t.txt", kHead + kTail);
  at::NoGradGuard g;
  PerplexityOptions o;
  o.context = 512;
  PerplexityTaskResult r = evaluate_perplexity(m.model, *m.tokenizer, "t", tmp / "t.txt", o, 0.5);
  std::vector<int> t = m.tokenizer->encode(kTail, true, false);
  at::Tensor x = at::tensor(std::vector<int64_t>(t.begin(), t.end() - 1), at::kLong).view({1, -1});
  at::Tensor lp = at::log_softmax(m.model.forward(x)[0].to(at::kDouble), -1);
  double nll = 0;
  for (size_t i = 1; i < t.size(); ++i) nll -= lp[i - 1][t[i]].item<double>();
  EXPECT_EQ(r.ppl.tokens, static_cast<int64_t>(t.size()) - 1);
  EXPECT_NEAR(r.ppl.nll, nll, 1e-3);
  EXPECT_EQ(r.bytes, static_cast<int64_t>(kTail.size()));
  EXPECT_EQ(r.words, 10);
}

// The commands end to end: perplexity of a whole file (the default) and of its held-out tail.
TEST(Cli, PerplexityOfTheWholeFileOrItsHeldOutTail) {
  test::TempDir tmp;
  write_file_atomic(tmp / "t.txt", kHead + kTail);
  auto tok = load_tokenizer(test::asset("models/stories260K/tok512.bin"), 512);
  const std::string base = "perplexity -t 1 -q --json -m " + test::asset("models/stories260K/stories260K.bin") + " --text " + tmp / "t.txt";
  for (auto [flag, text] : std::vector<std::pair<std::string, std::string>>{{"", kHead + kTail}, {" --heldout 0.5", kTail}}) {
    test::CliResult r = test::run_cli(base + flag, tmp);
    ASSERT_EQ(r.code, 0) << flag << "\n" << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["tokens"].get<int64_t>(), static_cast<int64_t>(tok->encode(text, true, false).size()) - 1) << flag;
  }
  test::CliResult r = test::run_cli("eval -t 1 -q --json --assets " + test::assets_dir() + " -m " +
                                        test::asset("models/stories260K/stories260K.bin") + " --tasks copa --limit 4",
                                    tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["tasks"]["copa"]["n"].get<int64_t>(), 4);
}

// A choice as the task readers make it: continuation " " + text, normalised by the text.
Choice choice(const std::string& text) { return {"c", " " + text, text}; }

TEST(Harness, ScoringMatchesHandComputedValues) {
  Task t{"hand", "", true, {}};
  // Item 1: ll -3 over 10 characters vs -2 over 1: acc picks choice 1, acc_norm choice 0.
  t.items.push_back({{choice(std::string(10, 'x')), choice("y")}, 0});
  // Item 2: three choices, the gold one most likely and shortest.
  t.items.push_back({{choice("aa"), choice("bbbb"), choice("c")}, 2});
  // Items 3, 4: two-way, right and wrong.
  t.items.push_back({{choice("a"), choice("b")}, 0});
  t.items.push_back({{choice("a"), choice("b")}, 1});
  std::vector<double> ll = {-3, -2, -5, -6, -1, -1, -2, -1, -2};
  TaskResult r = score_task(t, ll);
  // acc: item 1 wrong (picks 1), item 2 right, item 3 right, item 4 wrong -> [0, 1, 1, 0].
  EXPECT_DOUBLE_EQ(r.acc, 0.5);
  // sample variance of [0, 1, 1, 0] is 1/3; stderr = sqrt(1/3 / 4).
  EXPECT_NEAR(r.acc_stderr, std::sqrt(1.0 / 12), 1e-12);
  // acc_norm: item 1 -0.3 vs -2 -> 0 (right); item 2 -2.5, -1.5, -1 -> 2 (right); items 3, 4 as acc.
  EXPECT_DOUBLE_EQ(r.acc_norm, 0.75);
  EXPECT_NEAR(r.acc_norm_stderr, std::sqrt(0.25 / 4), 1e-12);  // [1, 1, 1, 0]: variance 1/4
  EXPECT_NEAR(r.chance, (0.5 + 1.0 / 3 + 0.5 + 0.5) / 4, 1e-12);
}

// lm-evaluation-harness divides by len(choice) in Python: the choice text's characters, without
// the " " delimiter of the continuation and counting code points, not bytes. Here dividing by
// the continuation's length (or by bytes) picks the other choice.
TEST(Harness, AccNormDividesByTheChoiceTextsCharacters) {
  Task t{"norm", "", true, {}};
  // -2 / 1 = -2 against -3.2 / 2 = -1.6: choice 1. By continuation: -2 / 2 = -1 against -3.2 / 3: choice 0.
  t.items.push_back({{choice("a"), choice("bb")}, 1});
  // "éé" is 2 characters in 4 bytes: -3.6 / 2 = -1.8 against -1.7 / 1: choice 1. By bytes: -0.9 against -1.7: choice 0.
  t.items.push_back({{choice("\xC3\xA9\xC3\xA9"), choice("z")}, 1});
  TaskResult r = score_task(t, {-2, -3.2, -3.6, -1.7});
  EXPECT_DOUBLE_EQ(r.acc_norm, 1.0);
  EXPECT_DOUBLE_EQ(r.acc, 0.5);  // item 1: -2 > -3.2 picks 0 (wrong); item 2: -1.7 > -3.6 picks 1 (right)
  EXPECT_EQ(choice_length(t.items[1].choices[0]), 2);
}

TEST(Report, TableAndPlot) {
  test::TempDir tmp;
  std::vector<nlohmann::json> results;
  for (auto [method, bits, ppl, acc] : std::vector<std::tuple<std::string, double, double, double>>{
           {"fp32", 32, 4.8, 0.40}, {"rtn", 3.5, 11.4, 0.33}, {"dkm", 3.02, 5.6, 0.38}, {"dkm", 2.01, 13.7, 0.35}}) {
    results.push_back({{"label", method + std::to_string(int(bits))}, {"method", method}, {"bits_per_weight", bits},
                       {"tasks", {{"piqa", {{"n", 10}, {"acc", acc}, {"acc_stderr", 0.01}, {"acc_norm", acc}, {"acc_norm_stderr", 0.01}}},
                                  {"copa", {{"n", 10}, {"acc", acc + 0.1}, {"acc_stderr", 0.02}, {"chance", 0.5}}}}},
                       {"perplexity", {{"tinystories", {{"token_perplexity", ppl}}}}}});
  }
  const std::string md = report_markdown(results);
  // mean 43.0; its standard error sqrt(1.0^2 + 2.0^2) / 2 = 1.118.
  EXPECT_NE(md.find("| dkm3 | dkm | 3.02 | 38.0 ± 1.0ⁿ | 48.0 ± 2.0 | 43.0 ± 1.1 | 5.600 |"), std::string::npos) << md;
  // piqa records no chance level here, copa does; the mean is over the tasks that do.
  EXPECT_NE(md.find("| chance (uniform guess) | | | | 50.0 | 50.0 | |"), std::string::npos) << md;
  // A model scored on perplexity alone has an empty accuracy row, not a mean of 0.
  results.push_back({{"label", "gptq3"}, {"method", "gptq"}, {"bits_per_weight", 3.25}, {"tasks", nlohmann::json::object()},
                     {"perplexity", {{"tinystories", {{"token_perplexity", 9.5}}}}}});
  EXPECT_NE(report_markdown(results).find("| gptq3 | gptq | 3.25 | | | | 9.500 |"), std::string::npos) << report_markdown(results);
  report_plot(results, tmp / "r.png");
  const std::string png = read_file(tmp / "r.png");
  ASSERT_GT(png.size(), 1000u);
  EXPECT_EQ(png.substr(1, 3), "PNG");
}

}  // namespace
}  // namespace edkm
