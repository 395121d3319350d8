#include "common/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/error.h"

namespace edkm {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  std::string tmpl = path_ + ".tmp.XXXXXX";
  fd_ = ::mkstemp(tmpl.data());
  if (fd_ < 0) throw_input("{}: cannot create output file: {}", path_, std::strerror(errno));
  tmp_path_ = tmpl;
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !tmp_path_.empty()) ::unlink(tmp_path_.c_str());
}

void AtomicFile::write(const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_input("{}: write failed: {}", path_, std::strerror(errno));
    }
    p += n;
    size -= static_cast<std::size_t>(n);
    written_ += static_cast<std::size_t>(n);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) throw_input("{}: fsync failed: {}", path_, std::strerror(errno));
  // mkstemp creates 0600; outputs get the usual 0644 (less the umask).
  mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd_, 0666 & ~mask);
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw_input("{}: close failed: {}", path_, std::strerror(errno));
  }
  fd_ = -1;
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0)
    throw_input("{}: cannot rename temporary file into place: {}", path_, std::strerror(errno));
  committed_ = true;
}

void remove_stale_temporaries(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  const std::string prefix = p.filename().string() + ".tmp.";
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() == prefix.size() + 6 && name.compare(0, prefix.size(), prefix) == 0 && e.is_regular_file(ec))
      fs::remove(e.path(), ec);
  }
}

void remove_tree(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(fs::symlink_status(dir, ec)))
    for (const auto& e : fs::directory_iterator(dir, ec)) remove_tree(e.path().string());
  fs::remove(dir, ec);
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  AtomicFile f(path);
  f.write(contents);
  f.commit();
}

void check_writable(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) throw_input("no output path given");
  const fs::path p(path);
  if (fs::is_directory(p)) throw_input("{}: is a directory, expected a file name", path);
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir)) throw_input("{}: directory {} does not exist", path, dir.string());
  if (::access(dir.c_str(), W_OK) != 0) throw_input("{}: cannot write to {}: {}", path, dir.string(), std::strerror(errno));
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_input("{}: cannot open: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw_input("{}: read failed", path);
  return ss.str();
}

namespace {

// Whether `out` names the same file as `in`, or (for an input directory) one of its files.
bool clobbers(const std::filesystem::path& out, const std::filesystem::path& in) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(out, ec) || !fs::exists(in, ec)) return false;
  if (fs::equivalent(out, in, ec)) return true;
  if (!fs::is_directory(in, ec)) return false;
  for (const auto& e : fs::directory_iterator(in, ec))
    if (e.is_regular_file(ec) && fs::equivalent(out, e.path(), ec)) return true;
  return false;
}

}  // namespace

void check_outputs_distinct(const std::vector<std::string>& outputs, const std::vector<InputPath>& inputs) {
  namespace fs = std::filesystem;
  for (size_t i = 0; i < outputs.size(); ++i) {
    for (const auto& in : inputs)
      if (!in.path.empty() && clobbers(outputs[i], in.path))
        throw_input("{}: is the input given with {} ({}); refusing to overwrite it, choose another output path",
                    outputs[i], in.option, in.path);
    std::error_code ec;
    const fs::path a = fs::weakly_canonical(fs::absolute(outputs[i]), ec);
    for (size_t j = 0; j < i; ++j)
      if (a == fs::weakly_canonical(fs::absolute(outputs[j]), ec) || clobbers(outputs[i], outputs[j]))
        throw_input("{}: the same path is given for two outputs ({} and {})", outputs[i], outputs[j], outputs[i]);
  }
}

}  // namespace edkm
