/*!
 * \file dlrmc_runtime.cc
 * \brief dlrmc::Model: load an artifact with the TVM runtime and run batches (see the header).
 */
#include "dlrmc_runtime.h"

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>
#include <sys/utsname.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace dlrmc {

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;
using tvm::ffi::Tensor;

namespace {

constexpr const char* kFormat = "dlrmc-artifact";
constexpr int64_t kFormatVersion = 1;
constexpr double kMaxPadding = 0.25;  // as dlrmc.runtime.plan.MAX_PADDING
constexpr int kPooledAllocator = 2;

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

json::Object Obj(const json::Value& v, const std::string& what) {
  auto o = v.try_cast<json::Object>();
  if (!o) throw Error("manifest.json: " + what + " is not an object");
  return *o;
}

json::Value Get(const json::Object& o, const std::string& key) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) throw Error("manifest.json lacks \"" + key + "\"");
  return (*it).second;
}

int64_t Int(const json::Value& v, const std::string& what) {
  auto i = v.try_cast<int64_t>();
  if (!i) throw Error("manifest.json: " + what + " is not an integer");
  return *i;
}

std::string Str(const json::Value& v, const std::string& what) {
  auto s = v.try_cast<ffi::String>();
  if (!s) throw Error("manifest.json: " + what + " is not a string");
  return std::string(*s);
}

std::vector<int64_t> Ints(const json::Value& v, const std::string& what) {
  auto a = v.try_cast<json::Array>();
  if (!a) throw Error("manifest.json: " + what + " is not a list");
  std::vector<int64_t> out;
  for (const auto& x : *a) out.push_back(Int(x, what));
  return out;
}

/*! \brief TVM runtime's global function ``name`` (the wheel ships no runtime headers beyond
 *  tvm-ffi's, so tensors on a device are made and copied through these, as TVM's Python does). */
ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) throw Error(std::string("the TVM runtime lacks ") + name);
  return *f;
}

/*! \brief A tensor on ``dev`` holding ``bytes`` of host ``data``. */
Tensor Make(const std::vector<int64_t>& shape, DLDataType dtype, const void* data, size_t bytes,
            DLDevice dev) {
  static const ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
  static const ffi::Function copy = Global("runtime.TVMTensorCopyFromBytes");
  Tensor t = alloc(ffi::Shape(shape), dtype, dev, ffi::Optional<ffi::String>()).cast<Tensor>();
  if (bytes) copy(t, const_cast<void*>(data), static_cast<int64_t>(bytes));
  return t;
}

/*! \brief Why no CUDA artifact can run here, or "" (as dlrmc.runtime.model.cuda_unavailable):
 *  loads TVM's CUDA runtime, a sidecar library beside libtvm_runtime.so, when not loaded. */
std::string CudaUnavailable() {
  if (!ffi::Function::GetGlobal("device_api.cuda").has_value()) {
    std::string lib = "libtvm_runtime_cuda.so";
    if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      std::string first = dlerror();
#ifdef DLRMC_TVM_LIB_DIR
      lib = std::string(DLRMC_TVM_LIB_DIR) + "/" + lib;
      if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL))
#endif
        return "TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load: " + first;
    }
  }
  constexpr int kExist = 0;  // TVM's DeviceAttrKind
  bool exist = Global("runtime.GetDeviceAttr")(static_cast<int>(kDLCUDA), 0, kExist)
                   .cast<int64_t>() != 0;
  return exist ? "" : "no CUDA GPU found";
}

}  // namespace

struct Model::Impl {
  std::string dir;
  DLDevice dev{kDLCPU, 0};
  int64_t num_dense = 0;
  std::vector<int64_t> rows;
  ffi::Optional<ffi::Module> vm;  // set by the constructor
  ffi::Function main;
  std::map<int64_t, ffi::Function> buckets;
  std::vector<Tensor> weights;  // after transform_params: what main takes after the inputs

  std::vector<float> Run(const ffi::Function& fn, int64_t b, const float* dense,
                         const std::vector<std::vector<int64_t>>& off,
                         const std::vector<std::vector<int64_t>>& idx) const;
};

Model::Model(const std::string& artifact_dir) : impl_(new Impl) {
  Impl& m = *impl_;
  m.dir = artifact_dir;
  ffi::String err;
  json::Value parsed = json::Parse(ReadFile(artifact_dir + "/manifest.json"), &err);
  if (!err.empty()) throw Error(artifact_dir + "/manifest.json is corrupt: " + std::string(err));
  json::Object man = Obj(parsed, "the manifest");
  if (Str(Get(man, "format"), "format") != kFormat)
    throw Error(artifact_dir + " is not a dlrmc artifact");
  if (Int(Get(man, "format_version"), "format_version") != kFormatVersion)
    throw Error(artifact_dir + " has another artifact format version; recompile the model");
  json::Object target = Obj(Get(man, "target"), "target");
  json::Object resolved = Obj(Get(target, "resolved"), "target.resolved");
  std::string kind = Str(Get(resolved, "kind"), "target kind");
  json::Object requires = Obj(Get(target, "requires"), "target.requires");
  if (kind == "cuda") {
    auto arch_it = requires.find(ffi::String("cuda_arch"));
    std::string arch = arch_it == requires.end() ? "?" : Str((*arch_it).second, "cuda_arch");
    std::string why = CudaUnavailable();
    if (!why.empty())
      throw Error(artifact_dir + " was built for CUDA (" + arch + ") and cannot run here: " + why);
    m.dev = DLDevice{kDLCUDA, 0};
  } else if (kind != "llvm") {
    throw Error(artifact_dir + " was built for " + kind + "; this runner runs llvm and cuda "
                "artifacts");
  }
  auto machine_it = requires.find(ffi::String("machine"));
  if (machine_it != requires.end()) {
    std::string want = Str((*machine_it).second, "machine");
    utsname u{};
    uname(&u);
    std::string have = u.machine;
    if (want != have && !(want == "aarch64" && have == "arm64"))
      throw Error("the artifact was built for " + want + "; this machine is " + have);
  }
  json::Object arch = Obj(Get(man, "arch"), "arch");
  m.num_dense = Ints(Get(arch, "mlp_bot"), "arch.mlp_bot").at(0);
  m.rows = Ints(Get(arch, "embedding_sizes"), "arch.embedding_sizes");

  std::string lib = artifact_dir + "/model.so";
  {
    std::ifstream probe(lib);
    if (!probe) throw Error("artifact file " + lib + " is missing");
  }
  try {
    ffi::Module exec = ffi::Module::LoadFromFile(lib);
    ffi::Module vm = exec->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    m.vm = vm;
    ffi::Function init = vm->GetFunction("vm_initialization").value();
    if (m.dev.device_type == kDLCPU)
      init(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    else  // the GPU, then the host for the VM's shape computations
      init(static_cast<int>(m.dev.device_type), m.dev.device_id, kPooledAllocator,
           static_cast<int>(kDLCPU), 0, kPooledAllocator);
    m.main = vm->GetFunction(Str(Get(man, "entry"), "entry")).value();
    json::Object buckets = Obj(Get(man, "buckets"), "buckets");
    for (const auto& kv : buckets) {
      int64_t b = std::stoll(std::string(kv.first.cast<ffi::String>()));
      m.buckets[b] = vm->GetFunction(Str(kv.second, "bucket entry")).value();
    }
  } catch (const ffi::Error& e) {
    throw Error("cannot load " + lib + ": " + e.what());
  }

  // Weights: weights.bin, each tensor at its offset, then transform_params once.
  json::Object wspec = Obj(Get(man, "weights"), "weights");
  std::string blob = ReadFile(artifact_dir + "/" + Str(Get(wspec, "file"), "weights.file"));
  auto tensors = Get(wspec, "tensors").try_cast<json::Array>();
  if (!tensors) throw Error("manifest.json: weights.tensors is not a list");
  ffi::Array<Tensor> raw;
  for (const auto& t : *tensors) {
    json::Object spec = Obj(t, "a weight");
    int64_t off = Int(Get(spec, "offset"), "offset"), n = Int(Get(spec, "nbytes"), "nbytes");
    if (off < 0 || n < 0 || static_cast<size_t>(off + n) > blob.size())
      throw Error("weights.bin is shorter than the manifest says (corrupt artifact)");
    DLDataType dtype = ffi::StringToDLDataType(Str(Get(spec, "dtype"), "dtype"));
    raw.push_back(Make(Ints(Get(spec, "shape"), "shape"), dtype, blob.data() + off, n, m.dev));
  }
  ffi::Function transform = m.vm.value()->GetFunction(Str(Get(man, "transform_params"),
                                                  "transform_params")).value();
  auto packed = transform(raw).cast<ffi::Array<ffi::Any>>();
  for (const auto& w : packed) m.weights.push_back(w.cast<Tensor>());
}

Model::~Model() = default;

int64_t Model::num_dense() const { return impl_->num_dense; }
int64_t Model::num_tables() const { return static_cast<int64_t>(impl_->rows.size()); }
const std::vector<int64_t>& Model::table_rows() const { return impl_->rows; }
std::vector<int64_t> Model::buckets() const {
  std::vector<int64_t> out;
  for (const auto& kv : impl_->buckets) out.push_back(kv.first);
  return out;
}

std::vector<float> Model::Impl::Run(const ffi::Function& fn, int64_t b, const float* dense,
                                    const std::vector<std::vector<int64_t>>& off,
                                    const std::vector<std::vector<int64_t>>& idx) const {
  const int64_t T = static_cast<int64_t>(rows.size());
  std::vector<int64_t> flat_off;
  for (const auto& o : off) flat_off.insert(flat_off.end(), o.begin(), o.end());
  std::vector<ffi::Any> args;
  args.push_back(Make({b, num_dense}, DLDataType{kDLFloat, 32, 1}, dense,
                      sizeof(float) * b * num_dense, dev));
  args.push_back(Make({T, b}, DLDataType{kDLInt, 64, 1}, flat_off.data(),
                      sizeof(int64_t) * flat_off.size(), dev));
  for (const auto& i : idx)
    args.push_back(Make({static_cast<int64_t>(i.size())}, DLDataType{kDLInt, 64, 1}, i.data(),
                        sizeof(int64_t) * i.size(), dev));
  for (const auto& w : weights) args.push_back(w);
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
  Tensor out = result.cast<Tensor>();
  if (out.numel() != b) throw Error("the model returned " + std::to_string(out.numel()) +
                                    " values for a batch of " + std::to_string(b));
  static const ffi::Function to_host = Global("runtime.TVMTensorCopyToBytes");
  std::vector<float> host(b);
  to_host(out, static_cast<void*>(host.data()), static_cast<int64_t>(sizeof(float) * b));
  return host;   // from the GPU too: the copy waits for it
}

std::vector<float> Model::Predict(const Batch& in) const {
  const Impl& m = *impl_;
  const int64_t B = in.batch, T = num_tables();
  // Validation, as dlrmc.runtime.validate.check_batch.
  if (B < 1) throw Error("the batch must have at least 1 row");
  if (static_cast<int64_t>(in.dense_x.size()) != B * m.num_dense)
    throw Error("dense_x must have shape [" + std::to_string(B) + ", " +
                std::to_string(m.num_dense) + "]: got " + std::to_string(in.dense_x.size()) +
                " values");
  if (static_cast<int64_t>(in.offsets.size()) != T * B)
    throw Error("lS_o must have shape [" + std::to_string(T) + ", " + std::to_string(B) +
                "] (tables, batch): got " + std::to_string(in.offsets.size()) + " values");
  if (static_cast<int64_t>(in.indices.size()) != T)
    throw Error("lS_i has " + std::to_string(in.indices.size()) + " index arrays, the model has " +
                std::to_string(T) + " tables");
  for (int64_t k = 0; k < T; ++k) {
    const int64_t* o = in.offsets.data() + k * B;
    const int64_t n = static_cast<int64_t>(in.indices[k].size());
    const std::string name = "lS_o[" + std::to_string(k) + "]";
    if (o[0] != 0) throw Error(name + "[0] is " + std::to_string(o[0]) +
                               "; the first bag must start at 0");
    for (int64_t b = 1; b < B; ++b)
      if (o[b] < o[b - 1])
        throw Error(name + " decreases at position " + std::to_string(b) +
                    "; offsets must be non-decreasing");
    if (o[B - 1] > n)
      throw Error(name + "[" + std::to_string(B - 1) + "] = " + std::to_string(o[B - 1]) +
                  " is past the end of lS_i[" + std::to_string(k) + "] (" + std::to_string(n) +
                  " indices)");
    for (int64_t p = 0; p < n; ++p) {
      int64_t v = in.indices[k][p];
      if (v < 0 || v >= m.rows[k])
        throw Error("lS_i[" + std::to_string(k) + "][" + std::to_string(p) + "] = " +
                    std::to_string(v) + " is out of range for table " + std::to_string(k) +
                    " with " + std::to_string(m.rows[k]) + " rows");
    }
  }
  // Plan, as dlrmc.runtime.plan.pick: (rows, entry batch; 0 = any-batch main).
  std::vector<std::pair<int64_t, int64_t>> plan;
  int64_t left = B;
  if (!m.buckets.empty()) {
    const int64_t top = m.buckets.rbegin()->first;
    while (left > top) {
      plan.emplace_back(top, top);
      left -= top;
    }
  }
  auto fit = m.buckets.lower_bound(left);
  if (fit != m.buckets.end() && fit->first - left <= kMaxPadding * fit->first)
    plan.emplace_back(left, fit->first);
  else if (left)
    plan.emplace_back(left, 0);
  // Run each piece (as dlrmc.runtime.plan.slice_batch): padding rows are zeros, empty bags.
  std::vector<float> out;
  int64_t start = 0;
  for (const auto& piece : plan) {
    const int64_t rows = piece.first, size = piece.second ? piece.second : piece.first;
    std::vector<float> dense(size * m.num_dense, 0.0f);
    std::copy(in.dense_x.begin() + start * m.num_dense,
              in.dense_x.begin() + (start + rows) * m.num_dense, dense.begin());
    std::vector<std::vector<int64_t>> off(T), idx(T);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t* o = in.offsets.data() + k * B;
      const int64_t lo = o[start];
      const int64_t hi = start + rows < B ? o[start + rows]
                                          : static_cast<int64_t>(in.indices[k].size());
      off[k].resize(size, hi - lo);
      for (int64_t b = 0; b < rows; ++b) off[k][b] = o[start + b] - lo;
      idx[k].assign(in.indices[k].begin() + lo, in.indices[k].begin() + hi);
    }
    const ffi::Function& fn = piece.second ? m.buckets.at(piece.second) : m.main;
    std::vector<float> part = m.Run(fn, size, dense.data(), off, idx);
    out.insert(out.end(), part.begin(), part.begin() + rows);
    start += rows;
  }
  return out;
}

}  // namespace dlrmc
