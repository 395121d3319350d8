// Outputs are never half-written: AtomicFile writes to a temporary file beside the target and
// renames it over the target only on commit(); if anything throws first, the destructor
// removes the temporary and the target is untouched.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

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

// Writes a whole file atomically.
void write_file_atomic(const std::string& path, std::string_view contents);

// Reads a whole file; InputError naming the path if it cannot.
std::string read_file(const std::string& path);

}  // namespace edkm
