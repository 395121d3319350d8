// eval: the zero-shot multiple-choice tasks compressed-LLM papers report, read from the shared
// files and turned into lm-evaluation-harness requests: for each choice, a context and a
// continuation whose log-likelihood given the context is scored.
//
//   piqa           "Question: {goal}\nAnswer:" + " {sol}"                          acc, acc_norm
//   arc_easy/      "Question: {question}\nAnswer:" + " {choice}"                   acc, acc_norm
//   arc_challenge
//   boolq          "{passage}\nQuestion: {question}?\nAnswer:" + " no" / " yes"    acc
//   copa           "{premise without final period} because|therefore" + "  {choice, first letter lowercased}"  acc
//                  (two spaces: the harness's target delimiter and its doc_to_choice's own)
//   hellaswag      "{activity}: {ctx}" + " {ending}"  (the harness's text cleaning)  acc, acc_norm
//   winogrande     partial evaluation: context = the sentence up to the blank with the option
//                  filled in, continuation = " " + the rest of the sentence (shared)    acc
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace edkm {

struct Choice {
  std::string context;
  std::string continuation;  // scored given the context; the target delimiter " " + the choice
  std::string choice;        // the choice as the harness's doc_to_choice gives it: acc_norm
                             // divides by its length in characters (not the continuation's)
};

struct MCItem {
  std::vector<Choice> choices;
  int gold = 0;
};

struct Task {
  std::string name;
  std::string source;          // the file(s) read
  bool acc_norm = false;       // the harness reports acc_norm for this task
  std::vector<MCItem> items;
};

// The task names `load_task` knows, in the order papers list them.
const std::vector<std::string>& task_names();

// Reads a task from its standard file under `assets` (../shared/assets layout). InputError
// naming the file and line for missing files or malformed lines.
Task load_task(const std::string& name, const std::string& assets);

// The readers behind load_task, for files in the same schema anywhere.
Task read_piqa(const std::string& jsonl, const std::string& labels);
Task read_winogrande(const std::string& jsonl);
Task read_hellaswag(const std::string& path);  // the 6-line text format, plain or .bz2
Task read_arc(const std::string& jsonl, const std::string& name);
Task read_boolq(const std::string& jsonl);
Task read_copa(const std::string& jsonl);

// HellaSwag's text cleaning in the harness: strip, " [title]" -> ". ", drop "[...]" markers,
// collapse double spaces.
std::string hellaswag_preprocess(const std::string& text);

}  // namespace edkm
