// cuDNN 9 fused attention through the backend (graph) API; the contract is in cudnn.h.
//
// The graphs are the ones NVIDIA's cudnn-frontend builds for its composite SDPA nodes
// (include/cudnn_frontend/node/scaled_dot_product_flash_attention.h: CompositeSDPANode and
// CompositeSDPABackwardNode, with the softmax of node/softmax.h CompositeSoftmaxNode and the
// causal mask of node/diagonal_band_mask.h CompositeDiagonalBandMaskNode), written here as plain
// backend descriptors; cuDNN recognises the pattern and runs one fused flash-attention kernel.
//   forward:  S = Q·Kᵀ; S *= scale; [causal: S = row ≥ col ? S : −∞]; M = max_row S;
//             E = exp(S − M); Z = Σ_row E; Stats = M + log Z (→ our lse); P = E / Z (bf16);
//             O = P·V
//   backward: Dsum = Σ_d dO·O (float32, in the workspace); S = scale·Q·Kᵀ − Stats; [causal mask];
//             P = exp(S); dV = Pᵀ·dO; dP = dO·Vᵀ; dS = scale·P·(dP − Dsum); dK = dSᵀ·Q;
//             dQacc = dS·K (float32, in the workspace); dQ = dQacc. With Hq > Hkv, dV and dK are
//             made per query head and summed over each group by a reduction (as the frontend does).
// Tensors are 4-D [b, h, s, d] views with strides, so our [B, T, H, hd] buffers are used in place:
// Q strides {T·Hq·hd, hd, Hq·hd, 1}; Kᵀ is K's view with the last two dims and strides swapped.
//
// Every enum value below was read in cudnn_graph.h of cuDNN 9.6.0 (as vendored in the public
// repository zspace/system.cuda-12.6, include/cudnn_graph.h) and cross-checked against the
// explicit values in public Rust and Mojo bindings of cuDNN 9 (found by searching for the names);
// positional enums (cudnnBackendDescriptorType_t, cudnnBackendAttributeType_t) were counted in the
// header and matched against those bindings. The attributes each descriptor takes, and their
// types, follow cudnn-frontend's lowering (cudnn_frontend_Tensor.h, cudnn_frontend_Operation.h,
// node/pointwise.h, node/reduction.h, node/matmul.h, node/reshape.h, cudnn_frontend_Heuristics.h,
// cudnn_frontend_ExecutionPlan.h, backend/execution_helpers.h).
#include "cudnn.h"

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "../common/error.h"

namespace magix::cuda::cudnn {
namespace {

// ---- cudnn_graph.h (9.6.0) ----
using cudnnStatus_t = int;
using cudnnHandle_t = struct cudnnContext*;
using Desc = void*;  // cudnnBackendDescriptor_t

// cudnnStatus_t
constexpr int CUDNN_STATUS_SUCCESS = 0;

// cudnnDataType_t
constexpr int CUDNN_DATA_FLOAT = 0;
constexpr int CUDNN_DATA_INT32 = 4;
constexpr int CUDNN_DATA_BFLOAT16 = 9;
constexpr int CUDNN_DATA_BOOLEAN = 11;

// cudnnPointwiseMode_t
constexpr int CUDNN_POINTWISE_ADD = 0;
constexpr int CUDNN_POINTWISE_MUL = 1;
constexpr int CUDNN_POINTWISE_DIV = 6;
constexpr int CUDNN_POINTWISE_SUB = 9;
constexpr int CUDNN_POINTWISE_EXP = 13;
constexpr int CUDNN_POINTWISE_LOG = 15;
constexpr int CUDNN_POINTWISE_IDENTITY = 21;
constexpr int CUDNN_POINTWISE_CMP_GE = 303;
constexpr int CUDNN_POINTWISE_CMP_LT = 304;
constexpr int CUDNN_POINTWISE_LOGICAL_AND = 400;
constexpr int CUDNN_POINTWISE_GEN_INDEX = 501;
constexpr int CUDNN_POINTWISE_BINARY_SELECT = 601;

// cudnnReduceTensorOp_t (the reduction descriptor's operator)
constexpr int CUDNN_REDUCE_TENSOR_ADD = 0;
constexpr int CUDNN_REDUCE_TENSOR_MAX = 3;

// cudnnBackendHeurMode_t
constexpr int CUDNN_HEUR_MODE_FALLBACK = 2;
constexpr int CUDNN_HEUR_MODE_A = 3;

// cudnnBackendAttributeType_t (positional in the header: HANDLE = 0, DATA_TYPE, BOOLEAN, INT64, ...)
constexpr int CUDNN_TYPE_HANDLE = 0;
constexpr int CUDNN_TYPE_DATA_TYPE = 1;
constexpr int CUDNN_TYPE_BOOLEAN = 2;
constexpr int CUDNN_TYPE_INT64 = 3;
constexpr int CUDNN_TYPE_VOID_PTR = 6;
constexpr int CUDNN_TYPE_HEUR_MODE = 8;
constexpr int CUDNN_TYPE_POINTWISE_MODE = 14;
constexpr int CUDNN_TYPE_BACKEND_DESCRIPTOR = 15;
constexpr int CUDNN_TYPE_REDUCTION_OPERATOR_TYPE = 18;

// cudnnBackendDescriptorType_t (positional: POINTWISE_DESCRIPTOR = 0, ...)
constexpr int CUDNN_BACKEND_POINTWISE_DESCRIPTOR = 0;
constexpr int CUDNN_BACKEND_ENGINECFG_DESCRIPTOR = 3;
constexpr int CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR = 4;
constexpr int CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR = 5;
constexpr int CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR = 13;
constexpr int CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR = 15;
constexpr int CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR = 16;
constexpr int CUDNN_BACKEND_TENSOR_DESCRIPTOR = 17;
constexpr int CUDNN_BACKEND_MATMUL_DESCRIPTOR = 18;
constexpr int CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR = 19;
constexpr int CUDNN_BACKEND_REDUCTION_DESCRIPTOR = 21;
constexpr int CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR = 22;
constexpr int CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR = 31;

// cudnnBackendAttributeName_t
constexpr int CUDNN_ATTR_POINTWISE_MODE = 0;
constexpr int CUDNN_ATTR_POINTWISE_MATH_PREC = 1;
constexpr int CUDNN_ATTR_POINTWISE_AXIS = 9;
constexpr int CUDNN_ATTR_ENGINEHEUR_MODE = 200;
constexpr int CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH = 201;
constexpr int CUDNN_ATTR_ENGINEHEUR_RESULTS = 202;
constexpr int CUDNN_ATTR_EXECUTION_PLAN_HANDLE = 400;
constexpr int CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG = 401;
constexpr int CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE = 402;
constexpr int CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR = 750;
constexpr int CUDNN_ATTR_OPERATION_POINTWISE_XDESC = 751;
constexpr int CUDNN_ATTR_OPERATION_POINTWISE_BDESC = 752;
constexpr int CUDNN_ATTR_OPERATION_POINTWISE_YDESC = 753;
constexpr int CUDNN_ATTR_OPERATION_POINTWISE_TDESC = 758;
constexpr int CUDNN_ATTR_OPERATIONGRAPH_HANDLE = 800;
constexpr int CUDNN_ATTR_OPERATIONGRAPH_OPS = 801;
constexpr int CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT = 900;
constexpr int CUDNN_ATTR_TENSOR_DATA_TYPE = 901;
constexpr int CUDNN_ATTR_TENSOR_DIMENSIONS = 902;
constexpr int CUDNN_ATTR_TENSOR_STRIDES = 903;
constexpr int CUDNN_ATTR_TENSOR_UNIQUE_ID = 906;
constexpr int CUDNN_ATTR_TENSOR_IS_VIRTUAL = 907;
constexpr int CUDNN_ATTR_TENSOR_IS_BY_VALUE = 908;
constexpr int CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS = 1000;
constexpr int CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS = 1001;
constexpr int CUDNN_ATTR_VARIANT_PACK_WORKSPACE = 1003;
constexpr int CUDNN_ATTR_MATMUL_COMP_TYPE = 1500;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_ADESC = 1520;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_BDESC = 1521;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_CDESC = 1522;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_DESC = 1523;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC = 1525;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC = 1526;
constexpr int CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC = 1527;
constexpr int CUDNN_ATTR_REDUCTION_OPERATOR = 1600;
constexpr int CUDNN_ATTR_REDUCTION_COMP_TYPE = 1601;
constexpr int CUDNN_ATTR_OPERATION_REDUCTION_XDESC = 1610;
constexpr int CUDNN_ATTR_OPERATION_REDUCTION_YDESC = 1611;
constexpr int CUDNN_ATTR_OPERATION_REDUCTION_DESC = 1612;
constexpr int CUDNN_ATTR_OPERATION_RESHAPE_XDESC = 2200;
constexpr int CUDNN_ATTR_OPERATION_RESHAPE_YDESC = 2201;

// The names of cudnnStatus_t (cudnn_graph.h 9.6.0), for error messages.
const char* status_name(int s) {
  switch (s) {
    case 0: return "CUDNN_STATUS_SUCCESS";
    case 1001: return "CUDNN_STATUS_NOT_INITIALIZED";
    case 1002: return "CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH";
    case 1003: return "CUDNN_STATUS_SERIALIZATION_VERSION_MISMATCH";
    case 1004: return "CUDNN_STATUS_DEPRECATED";
    case 1005: return "CUDNN_STATUS_LICENSE_ERROR";
    case 1006: return "CUDNN_STATUS_RUNTIME_IN_PROGRESS";
    case 1007: return "CUDNN_STATUS_RUNTIME_FP_OVERFLOW";
    case 1008: return "CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED";
    case 2000: return "CUDNN_STATUS_BAD_PARAM";
    case 2001: return "CUDNN_STATUS_INVALID_VALUE";
    case 2002: return "CUDNN_STATUS_BAD_PARAM_NULL_POINTER";
    case 2003: return "CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER";
    case 2004: return "CUDNN_STATUS_BAD_PARAM_NOT_FINALIZED";
    case 2005: return "CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND";
    case 2006: return "CUDNN_STATUS_BAD_PARAM_SIZE_INSUFFICIENT";
    case 2007: return "CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH";
    case 2008: return "CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH";
    case 2009: return "CUDNN_STATUS_BAD_PARAM_DUPLICATED_ENTRIES";
    case 2010: return "CUDNN_STATUS_BAD_PARAM_ATTRIBUTE_TYPE";
    case 2011: return "CUDNN_STATUS_BAD_PARAM_CUDA_GRAPH_MISMATCH";
    case 2012: return "CUDNN_STATUS_BAD_PARAM_DESCRIPTOR_TYPE";
    case 3000: return "CUDNN_STATUS_NOT_SUPPORTED";
    case 3001: return "CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN";
    case 3002: return "CUDNN_STATUS_NOT_SUPPORTED_SHAPE";
    case 3003: return "CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE";
    case 3004: return "CUDNN_STATUS_NOT_SUPPORTED_LAYOUT";
    case 3005: return "CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER";
    case 3006: return "CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART";
    case 3007: return "CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH";
    case 3008: return "CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING";
    case 3009: return "CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE";
    case 3010: return "CUDNN_STATUS_NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT";
    case 3011: return "CUDNN_STATUS_NOT_SUPPORTED_PADDING";
    case 3012: return "CUDNN_STATUS_NOT_SUPPORTED_BAD_LAUNCH_PARAM";
    case 3013: return "CUDNN_STATUS_NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API";
    case 4000: return "CUDNN_STATUS_INTERNAL_ERROR";
    case 4001: return "CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED";
    case 4002: return "CUDNN_STATUS_INTERNAL_ERROR_UNEXPECTED_VALUE";
    case 4003: return "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED";
    case 4004: return "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED";
    case 4005: return "CUDNN_STATUS_INTERNAL_ERROR_BAD_LAUNCH_PARAM";
    case 4006: return "CUDNN_STATUS_INTERNAL_ERROR_TEXTURE_CREATION_FAILED";
    case 5000: return "CUDNN_STATUS_EXECUTION_FAILED";
    case 5001: return "CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER";
    case 5002: return "CUDNN_STATUS_EXECUTION_FAILED_CUBLAS";
    case 5003: return "CUDNN_STATUS_EXECUTION_FAILED_CUDART";
    case 5004: return "CUDNN_STATUS_EXECUTION_FAILED_CURAND";
  }
  return "CUDNN_STATUS_UNKNOWN";
}

struct Lib {
  bool loaded = false;
  std::string error;
  size_t version = 0;
  size_t (*GetVersion)() = nullptr;
  cudnnStatus_t (*Create)(cudnnHandle_t*) = nullptr;
  cudnnStatus_t (*Destroy)(cudnnHandle_t) = nullptr;
  cudnnStatus_t (*SetStream)(cudnnHandle_t, cudaStream_t) = nullptr;
  const char* (*GetErrorString)(cudnnStatus_t) = nullptr;
  void (*GetLastErrorString)(char*, size_t) = nullptr;
  cudnnStatus_t (*CreateDescriptor)(int type, Desc*) = nullptr;
  cudnnStatus_t (*DestroyDescriptor)(Desc) = nullptr;
  cudnnStatus_t (*Finalize)(Desc) = nullptr;
  cudnnStatus_t (*SetAttribute)(Desc, int name, int type, int64_t count, const void* elements) = nullptr;
  cudnnStatus_t (*GetAttribute)(Desc, int name, int type, int64_t requested, int64_t* count, void* elements) = nullptr;
  cudnnStatus_t (*Execute)(cudnnHandle_t, Desc plan, Desc variantPack) = nullptr;
};

template <typename F>
bool sym(void* lib, const char* name, F& out, std::string& error) {
  out = reinterpret_cast<F>(dlsym(lib, name));
  if (!out && error.empty()) error = std::string("missing symbol ") + name;
  return out != nullptr;
}

const Lib& lib() {
  static Lib L = [] {
    Lib l;
    const char* path = std::getenv("MAGIX_CUDNN_PATH");
    const char* name = path && *path ? path : "libcudnn.so.9";
    void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      l.error = std::string("could not open ") + name + (e ? std::string(": ") + e : "");
      return l;
    }
    bool ok = true;
    ok &= sym(h, "cudnnGetVersion", l.GetVersion, l.error);
    ok &= sym(h, "cudnnCreate", l.Create, l.error);
    ok &= sym(h, "cudnnDestroy", l.Destroy, l.error);
    ok &= sym(h, "cudnnSetStream", l.SetStream, l.error);
    ok &= sym(h, "cudnnGetErrorString", l.GetErrorString, l.error);
    ok &= sym(h, "cudnnBackendCreateDescriptor", l.CreateDescriptor, l.error);
    ok &= sym(h, "cudnnBackendDestroyDescriptor", l.DestroyDescriptor, l.error);
    ok &= sym(h, "cudnnBackendFinalize", l.Finalize, l.error);
    ok &= sym(h, "cudnnBackendSetAttribute", l.SetAttribute, l.error);
    ok &= sym(h, "cudnnBackendGetAttribute", l.GetAttribute, l.error);
    ok &= sym(h, "cudnnBackendExecute", l.Execute, l.error);
    sym(h, "cudnnGetLastErrorString", l.GetLastErrorString, l.error);  // 9.0 and later; optional
    if (!ok) return l;
    l.version = l.GetVersion();
    if (l.version < 90000 || l.version >= 100000) {
      l.error = name + std::string(" is cuDNN ") + std::to_string(l.version) + ", not 9.x";
      return l;
    }
    l.loaded = true;
    return l;
  }();
  return L;
}

std::string last_error_text() {
  const Lib& L = lib();
  if (!L.GetLastErrorString) return "";
  char buf[2048];
  buf[0] = 0;
  L.GetLastErrorString(buf, sizeof buf);
  buf[sizeof buf - 1] = 0;
  return buf;
}

// A typed error in the style of check.h's CUBLAS_CHECK: code CUDNN_ERROR, the status name, the
// library's last-error text, the call and where.
[[noreturn]] void throw_cudnn(int status, const std::string& what, const char* file, int line) {
  const std::string name = status_name(status);
  std::string text = last_error_text();
  if (text.empty() && lib().GetErrorString) text = lib().GetErrorString(status);
  throw MagixError("CUDNN_ERROR", name + (text.empty() ? "" : ": " + text) + " (" + what + " at " + file + ":" +
                                      std::to_string(line) + ")")
      .with("status", static_cast<double>(status))
      .with("library", "cudnn")
      .with("name", name);
}

#define CUDNN_CHECK(expr)                                                                               \
  do {                                                                                                  \
    const int magix_cs_ = static_cast<int>(expr);                                                       \
    if (magix_cs_ != CUDNN_STATUS_SUCCESS) ::magix::cuda::cudnn::throw_cudnn(magix_cs_, #expr, __FILE__, __LINE__); \
  } while (0)

[[noreturn]] void throw_cuda(cudaError_t e, const char* what) {
  throw MagixError("CUDA_ERROR", std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) + " (" + what + ")")
      .with("status", static_cast<double>(e))
      .with("library", "cuda")
      .with("name", cudaGetErrorName(e));
}

// Descriptors, destroyed with their owner.
struct Owned {
  std::vector<Desc> all;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (!lib().loaded) return;
    for (auto it = all.rbegin(); it != all.rend(); ++it) lib().DestroyDescriptor(*it);
  }
  Desc make(int type) {
    Desc d = nullptr;
    CUDNN_CHECK(lib().CreateDescriptor(type, &d));
    all.push_back(d);
    return d;
  }
};

void set(Desc d, int name, int type, int64_t count, const void* v) { CUDNN_CHECK(lib().SetAttribute(d, name, type, count, v)); }
void set_desc(Desc d, int name, Desc v) { set(d, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v); }
void finalize(Desc d) { CUDNN_CHECK(lib().Finalize(d)); }

using Dims = std::vector<int64_t>;

// The graph under construction: tensors by uid, operations in order.
class Graph {
 public:
  explicit Graph(Owned& o) : own_(o) {}

  Desc tensor(int64_t uid, int dtype, const Dims& dims, const Dims& strides, bool isVirtual, bool byValue = false) {
    Desc t = own_.make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t align = 16;
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dtype);
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, static_cast<int64_t>(dims.size()), dims.data());
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, static_cast<int64_t>(strides.size()), strides.data());
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    const bool v = isVirtual, bv = byValue;
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &v);
    if (byValue) set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &bv);
    finalize(t);
    return t;
  }
  // An intermediate: never in memory.
  Desc virt(int dtype, const Dims& dims, const Dims& strides) { return tensor(next_++, dtype, dims, strides, true); }
  // A float32 scalar passed by value at execution (dims and strides {1, 1, 1, 1}).
  Desc scalar(int64_t uid) { return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true); }

  // y = mode(x[, b][, t]); GEN_INDEX takes `axis`.
  void pointwise(int mode, Desc x, Desc b, Desc t, Desc y, int compute = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    Desc pw = own_.make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &compute);
    if (mode == CUDNN_POINTWISE_GEN_INDEX) set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    finalize(pw);
    Desc op = own_.make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t) set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    finalize(op);
    ops_.push_back(op);
  }
  void reduction(int op_, Desc x, Desc y) {
    Desc r = own_.make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    const int compute = CUDNN_DATA_FLOAT;
    set(r, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute);
    set(r, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &op_);
    finalize(r);
    Desc op = own_.make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, r);
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    finalize(op);
    ops_.push_back(op);
  }
  // c = a·b over the last two dims (batch dims broadcast: the KV heads of a group); the optional
  // m, n, k overrides are per-batch int32 sequence lengths (the padding-mask workaround).
  void matmul(Desc a, Desc b, Desc c, Desc mOverride = nullptr, Desc nOverride = nullptr, Desc kOverride = nullptr) {
    Desc m = own_.make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    const int compute = CUDNN_DATA_FLOAT;
    set(m, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute);
    finalize(m);
    Desc op = own_.make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    if (mOverride) set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, mOverride);
    if (nOverride) set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, nOverride);
    if (kOverride) set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, kOverride);
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, m);
    finalize(op);
    ops_.push_back(op);
  }
  void reshape(Desc x, Desc y) {
    Desc op = own_.make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    finalize(op);
    ops_.push_back(op);
  }

  // The operation graph, then the first engine configuration (heuristics mode A, then the
  // fallback list) whose execution plan finalizes. Returns the plan.
  Desc plan(cudnnHandle_t handle, int64_t& workspace) {
    Desc g = own_.make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    set(g, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(ops_.size()), ops_.data());
    set(g, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    finalize(g);
    int lastStatus = CUDNN_STATUS_SUCCESS;
    std::string lastText;
    for (int mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      Desc heur = own_.make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
      set_desc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, g);
      set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
      int st = lib().Finalize(heur);
      if (st != CUDNN_STATUS_SUCCESS) {
        lastStatus = st, lastText = last_error_text();
        continue;
      }
      int64_t count = 0;
      st = lib().GetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr);
      if (st != CUDNN_STATUS_SUCCESS || count <= 0) {
        if (st != CUDNN_STATUS_SUCCESS) lastStatus = st, lastText = last_error_text();
        continue;
      }
      std::vector<Desc> cfgs;
      for (int64_t i = 0; i < count; ++i) cfgs.push_back(own_.make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      int64_t got = 0;
      CUDNN_CHECK(lib().GetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                                     cfgs.data()));
      for (int64_t i = 0; i < got; ++i) {
        Desc p = own_.make(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        set(p, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
        set_desc(p, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfgs[i]);
        st = lib().Finalize(p);
        if (st != CUDNN_STATUS_SUCCESS) {
          lastStatus = st, lastText = last_error_text();
          continue;
        }
        int64_t n = 0;
        workspace = 0;
        CUDNN_CHECK(lib().GetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n, &workspace));
        return p;
      }
    }
    if (lastStatus == CUDNN_STATUS_SUCCESS) lastStatus = 3000;  // CUDNN_STATUS_NOT_SUPPORTED: no engine at all
    const std::string name = status_name(lastStatus);
    throw MagixError("CUDNN_ERROR", name + (lastText.empty() ? "" : ": " + lastText) +
                                        " (no cuDNN engine finalized an execution plan for the attention graph)")
        .with("status", static_cast<double>(lastStatus))
        .with("library", "cudnn")
        .with("name", name);
  }

 private:
  Owned& own_;
  std::vector<Desc> ops_;
  int64_t next_ = 100;
};

// Tensor uids of the variant pack.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV, kScale, kNegInf, kOne, kSoftmaxSum, kdQAccum, kSeqQ, kSeqKV
};

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct Plan {
  Owned own;
  Desc plan = nullptr;
  size_t cudnnWorkspace = 0;  // the plan's own, at the start of the caller's workspace
  size_t sumOffset = 0, accOffset = 0, accBytes = 0;  // backward: Dsum and the dQ accumulator
  size_t total = 0;
  float scale = 1.f, negInf = 0.f, one = 1.f;  // by-value scalars (host memory read at execute)
  int32_t* seqLens = nullptr;  // padding-mask workaround: [2][B] int32, all T (device memory, kept)
  bool ok = false;
  std::string error;  // when !ok: the message of the failure, rethrown
  double status = 0;
  std::string statusName;
};

// Our layouts as [b, h, s, d] views.
Dims qdims(const SdpaShape& s, int64_t H) { return {s.B, H, s.T, s.hd}; }
Dims qstrides(const SdpaShape& s, int64_t H) { return {s.T * H * s.hd, s.hd, H * s.hd, 1}; }
Dims tdims(const SdpaShape& s, int64_t H) { return {s.B, H, s.hd, s.T}; }          // Kᵀ, Vᵀ
Dims tstrides(const SdpaShape& s, int64_t H) { return {s.T * H * s.hd, s.hd, 1, H * s.hd}; }
Dims rowdims(const SdpaShape& s) { return {s.B, s.Hq, s.T, 1}; }                    // lse, Dsum, max, sum
Dims rowstrides(const SdpaShape& s) { return {s.Hq * s.T, s.T, 1, 1}; }
Dims sdims(const SdpaShape& s) { return {s.B, s.Hq, s.T, s.T}; }                    // scores
Dims sstrides(const SdpaShape& s) { return {s.Hq * s.T * s.T, s.T * s.T, s.T, 1}; }
Dims ststrides(const SdpaShape& s) { return {s.Hq * s.T * s.T, s.T * s.T, 1, s.T}; }  // transposed view

// x with keys after the query masked to −∞ (top-left causal): row ≥ col ? x : −∞.
Desc causal_mask(Graph& g, const SdpaShape& s, Desc x, Desc negInf) {
  Desc row = g.virt(CUDNN_DATA_INT32, sdims(s), sstrides(s));
  Desc col = g.virt(CUDNN_DATA_INT32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, row, CUDNN_DATA_INT32, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, col, CUDNN_DATA_INT32, 3);
  Desc keep = g.virt(CUDNN_DATA_BOOLEAN, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  Desc y = g.virt(CUDNN_DATA_FLOAT, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, x, negInf, keep, y);
  return y;
}

// The padding mask of cudnn-frontend (utils/attn_score_modifiers.h padding_mask): row < seqQ[b]
// and col < seqKV[b] ? x : −∞.
Desc padding_mask(Graph& g, const SdpaShape& s, Desc x, Desc negInf, Desc seqQ, Desc seqKV) {
  Desc row = g.virt(CUDNN_DATA_INT32, sdims(s), sstrides(s));
  Desc col = g.virt(CUDNN_DATA_INT32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, row, CUDNN_DATA_INT32, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, x, nullptr, nullptr, col, CUDNN_DATA_INT32, 3);
  Desc rowIn = g.virt(CUDNN_DATA_BOOLEAN, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_CMP_LT, row, seqQ, nullptr, rowIn, CUDNN_DATA_BOOLEAN);
  Desc colIn = g.virt(CUDNN_DATA_BOOLEAN, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_CMP_LT, col, seqKV, nullptr, colIn, CUDNN_DATA_BOOLEAN);
  Desc keep = g.virt(CUDNN_DATA_BOOLEAN, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_LOGICAL_AND, rowIn, colIn, nullptr, keep, CUDNN_DATA_BOOLEAN);
  Desc y = g.virt(CUDNN_DATA_FLOAT, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, x, negInf, keep, y);
  return y;
}

// cudnn-frontend's CompositeSDPABackwardNode: up to cuDNN 9.15.0, a backward whose s_kv is not a
// multiple of 128 runs with a padding mask of full lengths (seq_len_q = s_q, seq_len_kv = s_kv)
// and the matmuls' m/n/k overrides from those lengths (a workaround for a backend bug).
bool bwd_needs_padding(const SdpaShape& s, size_t version) { return version <= 91500 && s.T % 128 != 0; }

// The frontend masks with −∞ from cuDNN 9.10 and with the lowest float before.
float mask_value() {
  return lib().version >= 91000 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::lowest();
}

void build_fwd(Plan& P, const SdpaShape& s, cudnnHandle_t h) {
  Graph g(P.own);
  const int bf = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  Desc Q = g.tensor(kQ, bf, qdims(s, s.Hq), qstrides(s, s.Hq), false);
  Desc KT = g.tensor(kK, bf, tdims(s, s.Hkv), tstrides(s, s.Hkv), false);
  Desc V = g.tensor(kV, bf, qdims(s, s.Hkv), qstrides(s, s.Hkv), false);
  Desc O = g.tensor(kO, bf, qdims(s, s.Hq), qstrides(s, s.Hq), false);
  Desc Stats = g.tensor(kStats, f32, rowdims(s), rowstrides(s), false);
  Desc scale = g.scalar(kScale);

  Desc S = g.virt(f32, sdims(s), sstrides(s));
  g.matmul(Q, KT, S);
  Desc S1 = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_MUL, S, scale, nullptr, S1);
  if (s.causal) S1 = causal_mask(g, s, S1, g.scalar(kNegInf));
  Desc M = g.virt(f32, rowdims(s), rowstrides(s));
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, S1, M);
  Desc D = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_SUB, S1, M, nullptr, D);
  Desc E = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_EXP, D, nullptr, nullptr, E);
  Desc Z = g.virt(f32, rowdims(s), rowstrides(s));
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, E, Z);
  Desc LZ = g.virt(f32, rowdims(s), rowstrides(s));
  g.pointwise(CUDNN_POINTWISE_LOG, Z, nullptr, nullptr, LZ);
  g.pointwise(CUDNN_POINTWISE_ADD, M, LZ, nullptr, Stats);
  Desc Pr = g.virt(bf, sdims(s), sstrides(s));  // bf16: the second matmul's A operand
  g.pointwise(CUDNN_POINTWISE_DIV, E, Z, nullptr, Pr);
  g.matmul(Pr, V, O);

  int64_t ws = 0;
  P.plan = g.plan(h, ws);
  P.cudnnWorkspace = static_cast<size_t>(ws);
  P.total = P.cudnnWorkspace;
}

void build_bwd(Plan& P, const SdpaShape& s, cudnnHandle_t h) {
  Graph g(P.own);
  const int bf = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  const bool gqa = s.Hq != s.Hkv;
  Desc Q = g.tensor(kQ, bf, qdims(s, s.Hq), qstrides(s, s.Hq), false);
  Desc KT = g.tensor(kK, bf, tdims(s, s.Hkv), tstrides(s, s.Hkv), false);
  Desc VT = g.tensor(kV, bf, tdims(s, s.Hkv), tstrides(s, s.Hkv), false);
  Desc O = g.tensor(kO, bf, qdims(s, s.Hq), qstrides(s, s.Hq), false);
  Desc Stats = g.tensor(kStats, f32, rowdims(s), rowstrides(s), false);
  Desc dO = g.tensor(kdO, bf, qdims(s, s.Hq), qstrides(s, s.Hq), false);
  Desc dQ = g.tensor(kdQ, bf, qdims(s, s.Hq), qstrides(s, s.Hq), false);
  Desc dK = g.tensor(kdK, bf, qdims(s, s.Hkv), qstrides(s, s.Hkv), false);
  Desc dV = g.tensor(kdV, bf, qdims(s, s.Hkv), qstrides(s, s.Hkv), false);
  Desc scale = g.scalar(kScale);
  Desc one = g.scalar(kOne);
  const Dims bhsd = {s.B, s.Hq, s.T, s.hd}, bhsdStrides = {s.Hq * s.T * s.hd, s.T * s.hd, s.hd, 1};
  Desc sum = g.tensor(kSoftmaxSum, f32, rowdims(s), rowstrides(s), false);  // in the workspace
  Desc acc = g.tensor(kdQAccum, f32, bhsd, bhsdStrides, false);             // in the workspace
  const bool pad = bwd_needs_padding(s, lib().version);
  Desc seqQ = nullptr, seqKV = nullptr, negInf = nullptr;
  if (pad) {
    seqQ = g.tensor(kSeqQ, CUDNN_DATA_INT32, {s.B, 1, 1, 1}, {1, 1, 1, 1}, false);
    seqKV = g.tensor(kSeqKV, CUDNN_DATA_INT32, {s.B, 1, 1, 1}, {1, 1, 1, 1}, false);
  }
  if (pad || s.causal) negInf = g.scalar(kNegInf);

  // Dsum = Σ_d dO·O
  Desc dOO = g.virt(f32, bhsd, {s.Hq * s.T * s.hd, s.T * s.hd, s.Hq * s.hd, 1});
  g.pointwise(CUDNN_POINTWISE_MUL, dO, O, nullptr, dOO);
  Desc red = g.virt(f32, rowdims(s), rowstrides(s));
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, dOO, red);
  g.pointwise(CUDNN_POINTWISE_MUL, red, one, nullptr, sum);

  // P = exp(scale·Q·Kᵀ − Stats), masked
  Desc S = g.virt(f32, sdims(s), sstrides(s));
  g.matmul(Q, KT, S, seqQ, seqKV);
  Desc S1 = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_MUL, S, scale, nullptr, S1);
  if (pad) S1 = padding_mask(g, s, S1, negInf, seqQ, seqKV);
  Desc S2 = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_SUB, S1, Stats, nullptr, S2);
  // 9.0 ≤ cuDNN < 9.10: the frontend puts the padding value in again after the stats.
  if (pad && lib().version < 91000) S2 = padding_mask(g, s, S2, negInf, seqQ, seqKV);
  if (s.causal) S2 = causal_mask(g, s, S2, negInf);
  Desc Pe = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_EXP, S2, nullptr, nullptr, Pe);

  // dV = Pᵀ·dO (per query head, then summed over the group)
  Desc PT = g.virt(bf, sdims(s), ststrides(s));
  g.reshape(Pe, PT);
  if (!gqa) {
    g.matmul(PT, dO, dV, seqKV, nullptr, seqQ);
  } else {
    Desc dVfull = g.virt(bf, bhsd, bhsdStrides);
    g.matmul(PT, dO, dVfull, seqKV, nullptr, seqQ);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dVfull, dV);
  }

  // dS = scale·P·(dO·Vᵀ − Dsum)
  Desc dP = g.virt(f32, sdims(s), sstrides(s));
  g.matmul(dO, VT, dP, seqQ, seqKV);
  Desc t1 = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_SUB, dP, sum, nullptr, t1);
  Desc t2 = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_MUL, t1, Pe, nullptr, t2);
  Desc dS = g.virt(f32, sdims(s), sstrides(s));
  g.pointwise(CUDNN_POINTWISE_MUL, t2, scale, nullptr, dS);

  // dK = dSᵀ·Q
  Desc dST = g.virt(bf, sdims(s), ststrides(s));
  g.reshape(dS, dST);
  if (!gqa) {
    g.matmul(dST, Q, dK, seqKV, nullptr, seqQ);
  } else {
    Desc dKfull = g.virt(bf, bhsd, bhsdStrides);
    g.matmul(dST, Q, dKfull, seqKV, nullptr, seqQ);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dKfull, dK);
  }

  // dQ = dS·K through the float32 accumulator
  Desc K = g.virt(bf, qdims(s, s.Hkv), qstrides(s, s.Hkv));
  g.reshape(KT, K);
  g.matmul(dS, K, acc, seqQ, nullptr, seqKV);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, acc, nullptr, nullptr, dQ);

  int64_t ws = 0;
  P.plan = g.plan(h, ws);
  P.cudnnWorkspace = static_cast<size_t>(ws);
  P.sumOffset = align256(P.cudnnWorkspace);
  P.accOffset = P.sumOffset + align256(static_cast<size_t>(s.B * s.Hq * s.T) * 4);
  P.accBytes = static_cast<size_t>(s.B * s.Hq * s.T * s.hd) * 4;
  P.total = P.accOffset + align256(P.accBytes);
  if (pad) {  // the lengths, once, in device memory of their own (built outside any capture)
    std::vector<int32_t> lens(2 * s.B, static_cast<int32_t>(s.T));
    void* d = nullptr;
    cudaError_t e = cudaMalloc(&d, lens.size() * 4);
    if (e != cudaSuccess) throw_cuda(e, "cudaMalloc(sequence lengths)");
    P.seqLens = static_cast<int32_t*>(d);
    e = cudaMemcpy(d, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) throw_cuda(e, "cudaMemcpy(sequence lengths)");
  }
}

std::mutex& mu() {
  static std::mutex m;
  return m;
}

cudnnHandle_t handle(int device) {
  static std::map<int, cudnnHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  int cur = -1;
  cudaError_t e = cudaGetDevice(&cur);
  if (e != cudaSuccess) throw_cuda(e, "cudaGetDevice");
  if (cur != device && (e = cudaSetDevice(device)) != cudaSuccess) throw_cuda(e, "cudaSetDevice");
  cudnnHandle_t h = nullptr;
  const int st = lib().Create(&h);
  if (cur != device) cudaSetDevice(cur);
  if (st != CUDNN_STATUS_SUCCESS) throw_cudnn(st, "cudnnCreate", __FILE__, __LINE__);
  handles[device] = h;
  return h;
}

// `device` current for a scope.
struct DeviceGuard {
  int prev = -1, dev;
  explicit DeviceGuard(int d) : dev(d) {
    cudaError_t e = cudaGetDevice(&prev);
    if (e != cudaSuccess) throw_cuda(e, "cudaGetDevice");
    if (prev != dev && (e = cudaSetDevice(dev)) != cudaSuccess) throw_cuda(e, "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev >= 0 && prev != dev) cudaSetDevice(prev);
  }
};

using Key = std::tuple<int, bool, int64_t, int64_t, int64_t, int64_t, int64_t, bool, uint32_t>;

Key key_of(const SdpaShape& s, int device, bool bwd) {
  uint32_t scaleBits;
  std::memcpy(&scaleBits, &s.scale, 4);
  return Key{device, bwd, s.B, s.T, s.Hq, s.Hkv, s.hd, s.causal, scaleBits};
}

// Never destroyed: plans are freed with the process, not by static destructors that may run
// after the CUDA context is gone.
std::map<Key, std::unique_ptr<Plan>>& cache() {
  static auto* c = new std::map<Key, std::unique_ptr<Plan>>();
  return *c;
}

void check_usable(const SdpaShape& s, bool bwd) {
  if (!lib().loaded)
    throw MagixError("CUDNN_ERROR", "cuDNN unavailable: " + lib().error).with("library", "cudnn").with("name", "CUDNN_UNAVAILABLE");
  if (!sdpa_in_scope(s, bwd)) invalid("cudnn sdpa: shape outside the supported scope for cuDNN " + std::to_string(lib().version) + " (cudnn.h)");
}

// The cached plan for the shape (built on first use, under mu()); throws its build error.
Plan& get(const SdpaShape& s, int device, bool bwd) {
  check_usable(s, bwd);
  auto& c = cache();
  const Key k = key_of(s, device, bwd);
  auto it = c.find(k);
  if (it == c.end()) {
    auto P = std::make_unique<Plan>();
    P->scale = s.scale;
    P->negInf = mask_value();
    try {
      DeviceGuard on(device);
      cudnnHandle_t h = handle(device);
      if (bwd) build_bwd(*P, s, h);
      else build_fwd(*P, s, h);
      P->ok = true;
    } catch (const MagixError& e) {
      P->ok = false;
      P->error = e.what();
      auto f = e.fields.find("status");
      P->status = f == e.fields.end() ? 0 : f->second;
      auto n = e.texts.find("name");
      P->statusName = n == e.texts.end() ? "CUDNN_ERROR" : n->second;
    }
    it = c.emplace(k, std::move(P)).first;
  }
  Plan& P = *it->second;
  if (!P.ok)
    throw MagixError("CUDNN_ERROR", P.error).with("status", P.status).with("library", "cudnn").with("name", P.statusName);
  return P;
}

bool ready(const SdpaShape& s, int device, cudaStream_t stream, size_t& workspace, bool bwd) {
  if (!lib().loaded || !sdpa_in_scope(s, bwd)) return false;
  std::lock_guard<std::mutex> lock(mu());
  auto& c = cache();
  auto it = c.find(key_of(s, device, bwd));
  if (it == c.end()) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) return false;
  }
  try {
    workspace = get(s, device, bwd).total;
    return true;
  } catch (const MagixError&) {
    return false;
  }
}

void execute(Plan& P, int device, cudaStream_t stream, const std::vector<int64_t>& uids, const std::vector<void*>& ptrs,
             void* workspace) {
  cudnnHandle_t h = handle(device);
  CUDNN_CHECK(lib().SetStream(h, stream));
  Owned own;
  Desc vp = own.make(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  set(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()), uids.data());
  set(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<int64_t>(ptrs.size()), ptrs.data());
  void* ws = P.cudnnWorkspace > 0 ? workspace : nullptr;
  set(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
  finalize(vp);
  CUDNN_CHECK(lib().Execute(h, P.plan, vp));
}

void check_workspace(const Plan& P, void* workspace) {
  if (P.total > 0 && !workspace) invalid("cudnn sdpa: a workspace of " + std::to_string(P.total) + " bytes is needed");
}

}  // namespace

bool sdpa_available() { return lib().loaded; }
const std::string& sdpa_unavailable_reason() { return lib().error; }
size_t version() { return lib().loaded ? lib().version : 0; }

bool sdpa_in_scope(const SdpaShape& s, bool backward) {
  const size_t v = lib().version;
  // cudnn-frontend (node/sdpa_support_surface.h, node/scaled_dot_product_flash_attention.h):
  // bf16 SDPA forward and backward refused on 9.10.0 and 9.10.1 ("known bugs"); s_q = s_kv = 1
  // refused. (Up to 9.15.0 a backward with s_kv % 128 != 0 takes the frontend's padding-mask
  // workaround: bwd_needs_padding.)
  if (v == 91000 || v == 91001) return false;
  return s.B > 0 && s.T > 1 && s.Hkv > 0 && s.Hq >= s.Hkv && s.Hq % s.Hkv == 0 && (s.hd == 64 || s.hd == 128) &&
         std::isfinite(s.scale);
}

size_t sdpa_fwd_workspace(const SdpaShape& s, int device) {
  std::lock_guard<std::mutex> lock(mu());
  return get(s, device, false).total;
}
size_t sdpa_bwd_workspace(const SdpaShape& s, int device) {
  std::lock_guard<std::mutex> lock(mu());
  return get(s, device, true).total;
}

bool sdpa_fwd_ready(const SdpaShape& s, int device, cudaStream_t stream, size_t& workspace) {
  return ready(s, device, stream, workspace, false);
}
bool sdpa_bwd_ready(const SdpaShape& s, int device, cudaStream_t stream, size_t& workspace) {
  return ready(s, device, stream, workspace, true);
}

void sdpa_fwd(const SdpaShape& s, int device, const void* q, const void* k, const void* v, void* o, float* lse,
              void* workspace, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu());
  Plan& P = get(s, device, false);
  check_workspace(P, workspace);
  std::vector<int64_t> uids = {kQ, kK, kV, kO, kStats, kScale};
  std::vector<void*> ptrs = {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), o, lse, &P.scale};
  if (s.causal) uids.push_back(kNegInf), ptrs.push_back(&P.negInf);
  execute(P, device, stream, uids, ptrs, workspace);
}

void sdpa_bwd(const SdpaShape& s, int device, const void* q, const void* k, const void* v, const void* o,
              const float* lse, const void* dO, void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu());
  Plan& P = get(s, device, true);
  check_workspace(P, workspace);
  char* ws = static_cast<char*>(workspace);
  if (lib().version < 90600) {  // before 9.6 the dQ accumulator starts from zeros (cudnn-frontend memsets it)
    const cudaError_t e = cudaMemsetAsync(ws + P.accOffset, 0, P.accBytes, stream);
    if (e != cudaSuccess) throw_cuda(e, "cudaMemsetAsync(dQ accumulator)");
  }
  std::vector<int64_t> uids = {kQ, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV, kScale, kOne, kSoftmaxSum, kdQAccum};
  std::vector<void*> ptrs = {const_cast<void*>(q), const_cast<void*>(k),  const_cast<void*>(v), const_cast<void*>(o),
                             const_cast<float*>(lse), const_cast<void*>(dO), dq, dk, dv, &P.scale, &P.one,
                             ws + P.sumOffset, ws + P.accOffset};
  if (s.causal || P.seqLens) uids.push_back(kNegInf), ptrs.push_back(&P.negInf);
  if (P.seqLens) {
    uids.push_back(kSeqQ), ptrs.push_back(P.seqLens);
    uids.push_back(kSeqKV), ptrs.push_back(P.seqLens + s.B);
  }
  execute(P, device, stream, uids, ptrs, workspace);
}

}  // namespace magix::cuda::cudnn
