#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace magix::cpu {
namespace {

thread_local bool t_in_pool = false;

// One parallel_for. Workers hold it by shared_ptr, so a worker that wakes late only ever
// sees the counters of the job it picked up, never those of a newer one.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable done_cv;
  std::exception_ptr error;

  void work() {
    for (;;) {
      int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      int64_t begin = c * chunk, end = std::min(n, begin + chunk);
      try {
        (*fn)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        done_cv.notify_all();
      }
    }
  }
};

class Pool {
 public:
  explicit Pool(int n) {
    for (int t = 1; t < n; ++t) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& f) {
    std::lock_guard<std::mutex> serial(serial_);
    auto job = std::make_shared<Job>();
    job->fn = &f;
    job->n = n;
    job->chunk = chunk;
    job->chunks = (n + chunk - 1) / chunk;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
    t_in_pool = true;
    job->work();
    t_in_pool = false;
    {
      std::unique_lock<std::mutex> lock(job->mu);
      job->done_cv.wait(lock, [&] { return job->done.load() == job->chunks; });
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void loop() {
    t_in_pool = true;
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      if (job) job->work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, serial_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  std::shared_ptr<Job> job_;
};

int configured_threads() {
  if (const char* env = std::getenv("MAGIX_NUM_THREADS")) {
    int v = std::atoi(env);
    if (v > 0) return v;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  // Never destroyed: joining threads during static destruction at process exit can deadlock.
  static Pool* p = new Pool(configured_threads());
  return *p;
}

}  // namespace

int num_threads() { return pool().size(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (t_in_pool || n <= grain) {
    f(0, n);
    return;
  }
  Pool& p = pool();
  if (p.size() == 1) {
    f(0, n);
    return;
  }
  // A few chunks per thread balance uneven rows without much scheduling cost.
  int64_t chunks = std::min<int64_t>(static_cast<int64_t>(p.size()) * 4, (n + grain - 1) / grain);
  int64_t chunk = (n + chunks - 1) / chunks;
  p.run(n, chunk, f);
}

}  // namespace magix::cpu
