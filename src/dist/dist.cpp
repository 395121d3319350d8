#include "dist/dist.h"

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#include <unistd.h>
#ifdef EDKM_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <thread>

#include "common/error.h"

namespace edkm {

// libtorch 2 moved the collectives from ProcessGroup to its backends (ProcessGroupGloo and
// ProcessGroupNCCL derive from Backend); both classes offer the same calls used here.
#if TORCH_VERSION_MAJOR >= 2
using Collectives = c10d::Backend;
#else
using Collectives = c10d::ProcessGroup;
#endif

struct Dist::Group {
  c10::intrusive_ptr<Collectives> pg;
  // Where tensors go for NCCL (the learner's GPU); CPU for Gloo, which takes any tensor.
  at::Device device{at::kCPU};

  // `t` where the backend takes it.
  at::Tensor staged(const at::Tensor& t) const { return device.is_cpu() || t.device() == device ? t : t.to(device); }
};

DistBackend parse_dist_backend(const std::string& s) {
  if (s == "gloo") return DistBackend::kGloo;
  if (s == "nccl") return DistBackend::kNCCL;
  throw_invalid("unknown distributed backend '{}' (expected gloo or nccl)", s);
}

bool has_nccl() {
#ifdef EDKM_NCCL
  return true;
#else
  return false;
#endif
}

namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  try {
    return std::stoi(v);
  } catch (const std::exception&) {
    throw_input("environment variable {}='{}' is not an integer", name, v);
  }
}

std::mutex g_mu;
std::shared_ptr<Dist> g_default;

}  // namespace

bool Dist::env_requests_group() { return env_int("WORLD_SIZE", 1) > 1; }

std::shared_ptr<Dist> Dist::from_env(std::chrono::seconds timeout, DistBackend backend) {
  auto d = std::make_shared<Dist>();
  d->backend_ = backend;
  d->world_ = env_int("WORLD_SIZE", 1);
  d->rank_ = env_int("RANK", 0);
  d->local_rank_ = env_int("LOCAL_RANK", d->rank_);
  if (d->world_ < 1 || d->rank_ < 0 || d->rank_ >= d->world_)
    throw_input("RANK={} is not in [0, WORLD_SIZE={})", d->rank_, d->world_);
  if (d->world_ == 1) return d;
  const char* addr = std::getenv("MASTER_ADDR");
  const int port = env_int("MASTER_PORT", -1);
  if (!addr || port <= 0 || port > 65535) throw_input("WORLD_SIZE={} needs MASTER_ADDR and MASTER_PORT", d->world_);
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = d->rank_ == 0;
  so.numWorkers = d->world_;
  so.waitWorkers = true;
  so.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  {
    // The rendezvous blocks until every learner has joined: say so, and every 10 s how long it
    // has waited, so that a missing peer is not mistaken for a hang.
    std::cerr << fmt::format("edkm: learner {} of {}: waiting for {} learners at {}:{} (gives up after {} s; "
                             "--dist-timeout)\n", d->rank_, d->world_, d->world_, addr, port, timeout.count());
    std::mutex mu;
    std::condition_variable cv;
    bool joined = false;
    std::thread reporter([&] {
      std::unique_lock<std::mutex> lock(mu);
      for (int waited = 10; !cv.wait_for(lock, std::chrono::seconds(10), [&] { return joined; }); waited += 10)
        std::cerr << fmt::format("edkm: learner {}: still waiting for the other learners at {}:{} ({} s)\n", d->rank_,
                                 addr, port, waited);
    });
    auto stop_reporter = [&] {
      {
        std::lock_guard<std::mutex> lock(mu);
        joined = true;
      }
      cv.notify_all();
      reporter.join();
    };
    try {
      store = c10::make_intrusive<c10d::TCPStore>(addr, so);
    } catch (const std::exception& e) {
      stop_reporter();
      throw_input("learner {}: rendezvous of {} learners at {}:{} failed after up to {} s: {}", d->rank_, d->world_,
                  addr, port, timeout.count(), e.what());
    }
    stop_reporter();
  }
  d->join(store, timeout, /*loopback=*/false);
  return d;
}

std::shared_ptr<Dist> Dist::with_file_store(const std::string& path, int rank, int world, std::chrono::seconds timeout,
                                             DistBackend backend) {
  auto d = std::make_shared<Dist>();
  d->rank_ = d->local_rank_ = rank;
  d->world_ = world;
  d->backend_ = backend;
  d->join(c10::make_intrusive<c10d::FileStore>(path, world), timeout, /*loopback=*/true);
  return d;
}

void Dist::join(const c10::intrusive_ptr<c10d::Store>& store, std::chrono::seconds timeout, bool loopback) {
  group_ = std::make_shared<Group>();
  if (backend_ == DistBackend::kNCCL) {
#ifdef EDKM_NCCL
    if (local_rank_ >= static_cast<int>(at::getNumGPUs()))
      throw_input("learner {} (LOCAL_RANK {}) needs GPU {}, but this machine has {} GPUs", rank_, local_rank_,
                  local_rank_, at::getNumGPUs());
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    group_->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank_, world_, opts);
    group_->device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank_));
    return;
#else
    throw_invalid("the NCCL backend needs a CUDA build of edkm with NCCL (README: the CUDA build); this one has Gloo only");
#endif
  }
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  opts->devices.push_back(loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                   : c10d::ProcessGroupGloo::createDefaultDevice());
  group_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank_, world_, opts);
}

void Dist::allreduce_sum(const std::vector<at::Tensor>& tensors) const {
  if (!group_ || tensors.empty()) return;
  constexpr int64_t kBucket = 25 << 20;
  std::vector<at::Tensor> bucket;
  int64_t bytes = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<at::Tensor> flat{group_->staged(at::cat([&] {
      std::vector<at::Tensor> v;
      for (const auto& t : bucket) v.push_back(t.reshape({-1}));
      return v;
    }()))};
    try {
      group_->pg->allreduce(flat)->wait();
    } catch (const std::exception& e) {
      throw_input("learner {}: gradient all-reduce failed (another learner stopped?): {}", rank_, e.what());
    }
    int64_t off = 0;
    for (auto& t : bucket) {
      t.copy_(flat[0].narrow(0, off, t.numel()).view_as(t));
      off += t.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (const auto& t : tensors) {
    if (!bucket.empty() && (bucket.front().scalar_type() != t.scalar_type() || bytes + t.nbytes() > kBucket)) flush();
    bucket.push_back(t);
    bytes += static_cast<int64_t>(t.nbytes());
  }
  flush();
}

at::Tensor Dist::all_gather(const at::Tensor& part) const {
  if (!group_) return part;
  // Gloo and NCCL have no 16-bit integer type: 2-byte data travels as fp16 bit patterns.
  const bool reinterpret = part.scalar_type() == at::kShort;
  at::Tensor in = group_->staged(reinterpret ? part.contiguous().view(at::kHalf) : part.contiguous());
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < world_; ++r) out[0].push_back(at::empty_like(in));
  std::vector<at::Tensor> inputs{in};
  try {
    group_->pg->allgather(out, inputs)->wait();
  } catch (const std::exception& e) {
    throw_input("learner {}: all-gather failed (another learner stopped?): {}", rank_, e.what());
  }
  at::Tensor all = at::cat(out[0]).to(part.device());
  return reinterpret ? all.view(at::kShort) : all;
}

void Dist::barrier() const {
  if (!group_) return;
  c10d::BarrierOptions opts;
  if (!group_->device.is_cpu()) opts.device_ids = {group_->device.index()};  // NCCL: the learner's GPU
  group_->pg->barrier(opts)->wait();
}

void set_default_dist(std::shared_ptr<Dist> d) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_default = std::move(d);
}

std::shared_ptr<Dist> default_dist() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_default;
}

namespace {

int free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  ::close(s);
  return port;
}

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& argv) {
  if (nproc < 1) throw_invalid("--nproc must be >= 1");
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < nproc; ++r) {
    pid_t pid = ::fork();
    if (pid < 0) throw_input("cannot start learner {}: {}", r, std::strerror(errno));
    if (pid == 0) {
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv("/proc/self/exe", args.data());
      std::perror("edkm: exec");
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  int first_failure = 0;
  for (size_t done = 0; done < pids.size(); ++done) {
    int status = 0;
    pid_t pid = ::wait(&status);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && first_failure == 0) {
      first_failure = code;
      size_t rank = std::find(pids.begin(), pids.end(), pid) - pids.begin();
      std::cerr << fmt::format("edkm: learner {} exited with status {}; stopping the others\n", rank, code);
      for (pid_t p : pids)
        if (p != pid) ::kill(p, SIGTERM);
    }
  }
  return first_failure;
}

}  // namespace edkm
