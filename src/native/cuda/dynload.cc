#include "dynload.h"

#include <dlfcn.h>

#include <cstdlib>

namespace magix::cuda {
namespace {

void* open_first(std::initializer_list<const char*> names, std::string& error) {
  for (const char* n : names) {
    if (void* h = dlopen(n, RTLD_NOW | RTLD_LOCAL)) return h;
  }
  const char* e = dlerror();
  error = std::string("could not open ") + *names.begin() + (e ? std::string(": ") + e : "");
  return nullptr;
}

template <typename F>
bool sym(void* lib, const char* name, F& out, std::string& error) {
  out = reinterpret_cast<F>(dlsym(lib, name));
  if (!out && error.empty()) error = std::string("missing symbol ") + name;
  return out != nullptr;
}

}  // namespace

const CublasLt& cublaslt() {
  static CublasLt lt = [] {
    CublasLt l;
    void* h = open_first({"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so",
                          "/usr/local/cuda/lib64/libcublasLt.so.13"}, l.error);
    if (!h) return l;
    bool ok = true;
    ok &= sym(h, "cublasLtGetVersion", l.GetVersion, l.error);
    ok &= sym(h, "cublasLtCreate", l.Create, l.error);
    ok &= sym(h, "cublasLtDestroy", l.Destroy, l.error);
    ok &= sym(h, "cublasLtMatmulDescCreate", l.MatmulDescCreate, l.error);
    ok &= sym(h, "cublasLtMatmulDescDestroy", l.MatmulDescDestroy, l.error);
    ok &= sym(h, "cublasLtMatmulDescSetAttribute", l.MatmulDescSetAttribute, l.error);
    ok &= sym(h, "cublasLtMatrixLayoutCreate", l.MatrixLayoutCreate, l.error);
    ok &= sym(h, "cublasLtMatrixLayoutDestroy", l.MatrixLayoutDestroy, l.error);
    ok &= sym(h, "cublasLtMatrixLayoutSetAttribute", l.MatrixLayoutSetAttribute, l.error);
    ok &= sym(h, "cublasLtMatmulPreferenceCreate", l.MatmulPreferenceCreate, l.error);
    ok &= sym(h, "cublasLtMatmulPreferenceDestroy", l.MatmulPreferenceDestroy, l.error);
    ok &= sym(h, "cublasLtMatmulPreferenceSetAttribute", l.MatmulPreferenceSetAttribute, l.error);
    ok &= sym(h, "cublasLtMatmulAlgoGetHeuristic", l.MatmulAlgoGetHeuristic, l.error);
    ok &= sym(h, "cublasLtMatmul", l.Matmul, l.error);
    sym(h, "cublasLtMatmulAlgoConfigGetAttribute", l.MatmulAlgoConfigGetAttribute, l.error);
    sym(h, "cublasLtGetStatusName", l.GetStatusName, l.error);
    sym(h, "cublasLtGetStatusString", l.GetStatusString, l.error);
    l.loaded = ok;
    return l;
  }();
  return lt;
}

const Nccl& nccl() {
  static Nccl nc = [] {
    Nccl n;
    setenv("NCCL_NVLS_ENABLE", "0", 0);  // before NCCL reads its environment
    void* h = open_first({"libnccl.so.2", "libnccl.so"}, n.error);
    if (!h) return n;
    bool ok = true;
    ok &= sym(h, "ncclGetVersion", n.GetVersion, n.error);
    ok &= sym(h, "ncclGetUniqueId", n.GetUniqueId, n.error);
    ok &= sym(h, "ncclCommInitRank", n.CommInitRank, n.error);
    ok &= sym(h, "ncclCommInitAll", n.CommInitAll, n.error);
    ok &= sym(h, "ncclCommDestroy", n.CommDestroy, n.error);
    ok &= sym(h, "ncclCommAbort", n.CommAbort, n.error);
    ok &= sym(h, "ncclAllReduce", n.AllReduce, n.error);
    ok &= sym(h, "ncclAllGather", n.AllGather, n.error);
    ok &= sym(h, "ncclReduceScatter", n.ReduceScatter, n.error);
    ok &= sym(h, "ncclBroadcast", n.Broadcast, n.error);
    ok &= sym(h, "ncclGroupStart", n.GroupStart, n.error);
    ok &= sym(h, "ncclGroupEnd", n.GroupEnd, n.error);
    ok &= sym(h, "ncclGetErrorString", n.GetErrorString, n.error);
    n.loaded = ok;
    return n;
  }();
  return nc;
}

}  // namespace magix::cuda
