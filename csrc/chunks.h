// Shares numbered chunks of work between the calling thread and one helper per further core.
//
// Chunks are taken from an atomic counter, so a helper that the OS has not scheduled yet holds
// nobody up: the caller takes its chunks too. Unlike an OpenMP team, no thread spins while idle.

#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

// The cores this process may run on.
inline int Workers() {
  static const int count = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return count;
}

class ChunkPool {
 public:
  explicit ChunkPool(int helpers) {
    for (int i = 0; i < helpers; ++i) std::thread([this] { Serve(); }).detach();
    helpers_ = helpers;
  }

  // Runs fn(0), ..., fn(count - 1) and returns when all have finished. A call made while
  // another is in progress (XLA may run two convolutions at once) runs its chunks alone.
  void Run(int64_t count, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || helpers_ == 0 || count < 2) {
      for (int64_t i = 0; i < count; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->count = count;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    Work(*job);
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return job->done.load() == count; });
    job_.reset();
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t count = 0;
    std::atomic<int64_t> next{0}, done{0};
  };

  // Takes chunks until none is left. fn stays valid while a taken chunk is unfinished,
  // because the caller waits for every chunk.
  void Work(Job& job) {
    for (int64_t i; (i = job.next.fetch_add(1)) < job.count;) {
      (*job.fn)(i);
      if (job.done.fetch_add(1) + 1 == job.count) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  void Serve() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job) Work(*job);
    }
  }

  int helpers_ = 0;
  std::mutex busy_, mutex_;
  std::condition_variable wake_, finished_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

// Runs fn over `count` chunks on the process-wide pool.
inline void ForEachChunk(int64_t count, const std::function<void(int64_t)>& fn) {
  static ChunkPool* pool = new ChunkPool(Workers() - 1);  // never destroyed: threads detach
  pool->Run(count, fn);
}
