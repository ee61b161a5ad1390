// A persistent pool of worker threads for the CPU kernels. One parallel_for at a time; a
// parallel_for issued from inside a worker runs inline, so kernels may nest freely.
#pragma once
#include <cstdint>
#include <functional>

namespace magix::cpu {

// Number of threads used by kernels (MAGIX_NUM_THREADS, else the hardware's count).
int num_threads();

// Calls f(begin, end) over disjoint ranges covering [0, n), each at least `grain` long
// (except the last), spread over the pool; returns when all are done.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

}  // namespace magix::cpu
