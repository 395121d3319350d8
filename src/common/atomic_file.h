// Outputs are never half-written: AtomicFile writes to a temporary file beside the target and
// renames it over the target only on commit(); if anything throws first, the destructor
// removes the temporary and the target is untouched.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace edkm {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view s) { write(s.data(), s.size()); }
  // Flushes to disk and renames the temporary over the target.
  void commit();

  const std::string& path() const { return path_; }
  std::size_t bytes_written() const { return written_; }

 private:
  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  std::size_t written_ = 0;
  bool committed_ = false;
};

// Removes the temporaries (`path`.tmp.XXXXXX) that an AtomicFile for `path` leaves when its
// process is killed (SIGKILL, power loss) before commit(). Call it before writing `path` again;
// a concurrent writer of the same path would lose its temporary.
void remove_stale_temporaries(const std::string& path);

// Removes a directory and everything in it; nothing if it does not exist. Not
// std::filesystem::remove_all: PyTorch 2.11's libtorch.so exports its own copy of
// std::filesystem, whose remove_all calls a libstdc++-internal function that newer libstdc++
// (GCC 13's) no longer has, so in a program linked against that libtorch it jumps to address 0.
void remove_tree(const std::string& dir);

// Writes a whole file atomically.
void write_file_atomic(const std::string& path, std::string_view contents);

// Checks that `path` can be written (its directory exists and is writable) before any work.
void check_writable(const std::string& path);

// Reads a whole file; InputError naming the path if it cannot.
std::string read_file(const std::string& path);

// A file or directory a command reads, with the option that named it (for messages).
struct InputPath {
  std::string option;  // "-m", "--data", ...
  std::string path;
};

// Refuses (InputError) to let a command overwrite what it reads: each output must not be one
// of the inputs, compared as files (std::filesystem::equivalent: through symbolic and hard
// links, "./", ".." and other spellings), nor a file directly inside an input directory (a
// Hugging Face model directory), nor another of the outputs. Outputs that do not exist yet
// cannot be inputs; they are compared with each other by their normalised absolute paths.
void check_outputs_distinct(const std::vector<std::string>& outputs, const std::vector<InputPath>& inputs);

}  // namespace edkm
