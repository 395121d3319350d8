#include "eval/tasks.h"

#include <bzlib.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"

namespace edkm {
namespace {

// Calls f(json, line number) for each non-empty line of a JSONL file.
template <typename F>
void for_each_json_line(const std::string& path, F&& f) {
  std::ifstream in(path);
  if (!in) throw_input("{}: cannot open", path);
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
      f(j, n);
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}:{}: malformed line: {}", path, n, e.what());
    }
  }
}

std::string str(const nlohmann::json& j, const char* key) {
  if (!j.contains(key)) throw nlohmann::json::other_error::create(501, std::string("missing field \"") + key + "\"", &j);
  return j.at(key).get<std::string>();
}

std::string rstrip(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

std::string read_maybe_bz2(const std::string& path) {
  std::string raw = read_file(path);
  if (raw.rfind("BZh", 0) != 0) return raw;
  std::string out;
  bz_stream s{};
  if (BZ2_bzDecompressInit(&s, 0, 0) != BZ_OK) throw_input("{}: cannot start bzip2 decompression", path);
  s.next_in = raw.data();
  s.avail_in = static_cast<unsigned>(raw.size());
  char buf[1 << 16];
  int rc;
  do {
    s.next_out = buf;
    s.avail_out = sizeof(buf);
    rc = BZ2_bzDecompress(&s);
    if (rc != BZ_OK && rc != BZ_STREAM_END) {
      BZ2_bzDecompressEnd(&s);
      throw_input("{}: corrupt bzip2 data (error {})", path, rc);
    }
    out.append(buf, sizeof(buf) - s.avail_out);
  } while (rc != BZ_STREAM_END && (s.avail_in > 0 || s.avail_out == 0));
  BZ2_bzDecompressEnd(&s);
  if (rc != BZ_STREAM_END) throw_input("{}: truncated bzip2 data", path);
  return out;
}

MCItem with_shared_context(const std::string& context, const std::vector<std::string>& choices, int gold) {
  MCItem it;
  for (const auto& c : choices) it.choices.push_back({context, " " + c, c});
  it.gold = gold;
  return it;
}

}  // namespace

const std::vector<std::string>& task_names() {
  static const std::vector<std::string> names = {"piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "boolq", "copa"};
  return names;
}

Task read_piqa(const std::string& jsonl, const std::string& labels) {
  Task t{"piqa", jsonl + " + " + labels, true, {}};
  std::ifstream lab(labels);
  if (!lab) throw_input("{}: cannot open", labels);
  for_each_json_line(jsonl, [&](const nlohmann::json& j, int64_t n) {
    std::string l;
    if (!std::getline(lab, l)) throw_input("{}: fewer labels than items in {} (item {})", labels, jsonl, n);
    l = rstrip(l);
    if (l != "0" && l != "1") throw_input("{}:{}: label '{}' is not 0 or 1", labels, n, l);
    t.items.push_back(with_shared_context("Question: " + str(j, "goal") + "\nAnswer:", {str(j, "sol1"), str(j, "sol2")}, l == "1"));
  });
  std::string extra;
  if (std::getline(lab, extra) && !rstrip(extra).empty()) throw_input("{}: more labels than items in {}", labels, jsonl);
  return t;
}

Task read_winogrande(const std::string& jsonl) {
  Task t{"winogrande", jsonl, false, {}};
  for_each_json_line(jsonl, [&](const nlohmann::json& j, int64_t n) {
    const std::string s = str(j, "sentence"), answer = str(j, "answer");
    const size_t blank = s.find('_');
    if (blank == std::string::npos) throw_input("{}:{}: sentence has no blank '_'", jsonl, n);
    if (answer != "1" && answer != "2") throw_input("{}:{}: answer '{}' is not 1 or 2", jsonl, n, answer);
    // Partial evaluation: the option goes into the context, the rest of the sentence is the
    // continuation scored under each context.
    std::string rest = s.substr(blank + 1);
    rest.erase(0, rest.find_first_not_of(" "));
    rest = rstrip(rest);
    MCItem it;
    for (const char* opt : {"option1", "option2"}) it.choices.push_back({s.substr(0, blank) + str(j, opt), " " + rest, str(j, opt)});
    it.gold = answer == "2";
    t.items.push_back(std::move(it));
  });
  return t;
}

std::string hellaswag_preprocess(const std::string& text) {
  std::string s = text;
  s.erase(0, s.find_first_not_of(" \t\r\n"));
  s = rstrip(s);
  for (size_t p; (p = s.find(" [title]")) != std::string::npos;) s.replace(p, 8, ". ");
  s = std::regex_replace(s, std::regex("\\[.*?\\]"), "");
  for (size_t p; (p = s.find("  ")) != std::string::npos;) s.replace(p, 2, " ");
  return s;
}

Task read_hellaswag(const std::string& path) {
  Task t{"hellaswag", path, true, {}};
  std::istringstream in(read_maybe_bz2(path));
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(rstrip(l));
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.size() % 6 != 0)
    throw_input("{}: {} lines is not a whole number of 6-line items (context, label, 4 endings)", path, lines.size());
  for (size_t i = 0; i < lines.size(); i += 6) {
    const std::string& label = lines[i + 1];
    if (label.size() != 1 || label[0] < '0' || label[0] > '3')
      throw_input("{}:{}: label '{}' is not 0..3", path, i + 2, label);
    std::vector<std::string> endings;
    for (int k = 0; k < 4; ++k) endings.push_back(hellaswag_preprocess(lines[i + 2 + k]));
    t.items.push_back(with_shared_context(hellaswag_preprocess(lines[i]), endings, label[0] - '0'));
  }
  return t;
}

Task read_arc(const std::string& jsonl, const std::string& name) {
  Task t{name, jsonl, true, {}};
  for_each_json_line(jsonl, [&](const nlohmann::json& j, int64_t n) {
    const auto& q = j.at("question");
    std::vector<std::string> texts;
    int gold = -1;
    const std::string key = str(j, "answerKey");
    for (const auto& c : q.at("choices")) {
      if (str(c, "label") == key) gold = static_cast<int>(texts.size());
      texts.push_back(str(c, "text"));
    }
    if (gold < 0) throw_input("{}:{}: answerKey '{}' is not among the choice labels", jsonl, n, key);
    t.items.push_back(with_shared_context("Question: " + str(q, "stem") + "\nAnswer:", texts, gold));
  });
  return t;
}

Task read_boolq(const std::string& jsonl) {
  Task t{"boolq", jsonl, false, {}};
  for_each_json_line(jsonl, [&](const nlohmann::json& j, int64_t n) {
    const auto& l = j.at("label");
    bool yes;
    if (l.is_boolean()) yes = l.get<bool>();
    else if (l.is_string() && (l == "true" || l == "false")) yes = l == "true";
    else if (l.is_number_integer() && (l == 0 || l == 1)) yes = l == 1;
    else throw_input("{}:{}: label {} is not a boolean", jsonl, n, l.dump());
    t.items.push_back(with_shared_context(str(j, "passage") + "\nQuestion: " + str(j, "question") + "?\nAnswer:", {"no", "yes"}, yes));
  });
  return t;
}

Task read_copa(const std::string& jsonl) {
  Task t{"copa", jsonl, false, {}};
  for_each_json_line(jsonl, [&](const nlohmann::json& j, int64_t n) {
    const std::string q = str(j, "question");
    if (q != "cause" && q != "effect") throw_input("{}:{}: question '{}' is not cause or effect", jsonl, n, q);
    std::string premise = rstrip(str(j, "premise"));
    if (!premise.empty()) premise.pop_back();  // the final period
    auto lower_first = [](std::string c) {
      if (!c.empty()) c[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(c[0])));
      return c;
    };
    const int label = j.at("label").get<int>();
    if (label != 0 && label != 1) throw_input("{}:{}: label {} is not 0 or 1", jsonl, n, label);
    // The harness's doc_to_choice already starts each choice with a space, and the target
    // delimiter adds another: the continuation is "  " + the choice, as in published COPA scores.
    t.items.push_back(with_shared_context(premise + (q == "cause" ? " because" : " therefore"),
                                          {" " + lower_first(str(j, "choice1")), " " + lower_first(str(j, "choice2"))}, label));
  });
  return t;
}

Task load_task(const std::string& name, const std::string& assets) {
  const std::string e = assets + "/eval/";
  auto need = [](const std::string& p) {
    if (!std::filesystem::exists(p)) throw_input("{}: task file not found", p);
    return p;
  };
  if (name == "piqa") return read_piqa(need(e + "piqa/valid.jsonl"), need(e + "piqa/valid-labels.lst"));
  if (name == "winogrande") return read_winogrande(need(e + "winogrande/dev.jsonl"));
  if (name == "hellaswag") return read_hellaswag(need(e + "hellaswag/hellaswag_val_full.txt.bz2"));
  if (name == "arc_easy") return read_arc(need(e + "arc/ARC-Easy-Test.jsonl"), "arc_easy");
  if (name == "arc_challenge") return read_arc(need(e + "arc/ARC-Challenge-Dev.jsonl"), "arc_challenge");
  if (name == "boolq") return read_boolq(need(e + "boolq/val.jsonl"));
  if (name == "copa") return read_copa(need(e + "copa/val.jsonl"));
  std::string known;
  for (const auto& n : task_names()) known += (known.empty() ? "" : ", ") + n;
  throw_invalid("unknown task '{}' (known: {})", name, known);
}

}  // namespace edkm
