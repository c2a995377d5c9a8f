/*!
 * \file dlrmc_runtime.cc
 * \brief dlrmc::Model: load an artifact with the TVM runtime and run batches (see the header).
 */
#include "dlrmc_runtime.h"

#include <cmath>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

namespace dlrmc {

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;
using tvm::ffi::Tensor;

namespace {

constexpr const char* kFormat = "dlrmc-artifact";
constexpr int64_t kFormatVersion = 3;  // as dlrmc.artifact.format.FORMAT_VERSION
constexpr int64_t kAlign = 64;         // as dlrmc.artifact.format.ALIGN
constexpr int kMaxDepth = 64;          // JSON nesting a manifest may have
constexpr double kMaxPadding = 0.25;    // as dlrmc.runtime.plan.MAX_PADDING
constexpr int64_t kMaxBucket = 1 << 16;  // as dlrmc.artifact.format.MAX_BUCKET
constexpr int kPooledAllocator = 2;

/*! \brief A file's bytes, read at the size it has when opened (one allocation: streaming it
 *  through a stringstream took minutes on a 2 GB weights file). */
std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw Error("cannot read " + path);
  std::string s(static_cast<size_t>(f.tellg()), '\0');
  f.seekg(0);
  if (!f.read(s.data(), static_cast<std::streamsize>(s.size())))
    throw Error("cannot read " + path + " (it changed while it was read)");
  return s;
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
  if (v.type_index() != ffi::TypeIndex::kTVMFFIInt)  // never a bool or a string
    throw Error("manifest.json: " + what + " is not an integer");
  return v.cast<int64_t>();
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

/*! \brief SHA-256 (FIPS 180-4) of a file's bytes, as lowercase hex. */
std::string Sha256(const std::string& data) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  std::string tail = data.substr(data.size() - data.size() % 64);
  tail.push_back(static_cast<char>(0x80));
  while (tail.size() % 64 != 56) tail.push_back(0);
  const uint64_t bits = static_cast<uint64_t>(data.size()) * 8;
  for (int i = 7; i >= 0; --i) tail.push_back(static_cast<char>(bits >> (8 * i)));
  auto block = [&](const unsigned char* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 |
             uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  };
  const auto* bytes = reinterpret_cast<const unsigned char*>(data.data());
  for (size_t i = 0; i + 64 <= data.size(); i += 64) block(bytes + i);
  for (size_t i = 0; i < tail.size(); i += 64)
    block(reinterpret_cast<const unsigned char*>(tail.data()) + i);
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

/*! \brief A manifest's file name, checked to be a plain name inside the artifact. */
std::string PlainName(const json::Value& v, const std::string& what) {
  std::string name = Str(v, what);
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\\') != std::string::npos || name.find('\0') != std::string::npos)
    throw Error("manifest.json: " + what + " '" + name +
                "' is not a plain file name inside the artifact");
  return name;
}

/*! \brief /proc/cpuinfo's flags (x86) or Features (``arm``); empty where there are none (no
 *  such file, or the host's under an emulator such as qemu-user). */
std::set<std::string> CpuFlags(bool arm) {
  std::ifstream f("/proc/cpuinfo");
  std::set<std::string> flags;
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(arm ? "Features" : "flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;) flags.insert(w);
  }
  return flags;
}

/*! \brief The weights a DLRM of this arch has, by name, with their float32 shapes (as
 *  dlrmc.frontend.arch.Arch.weight_shapes). */
std::map<std::string, std::vector<int64_t>> WeightShapes(const json::Object& arch) {
  std::vector<int64_t> rows = Ints(Get(arch, "embedding_sizes"), "arch.embedding_sizes");
  std::vector<int64_t> bot = Ints(Get(arch, "mlp_bot"), "arch.mlp_bot");
  std::vector<int64_t> top = Ints(Get(arch, "mlp_top"), "arch.mlp_top");
  int64_t dim = Int(Get(arch, "sparse_feature_size"), "arch.sparse_feature_size");
  std::string op = Str(Get(arch, "interaction_op"), "arch.interaction_op");
  auto itself = Get(arch, "interaction_itself").try_cast<bool>();
  if (!itself) throw Error("manifest.json: arch.interaction_itself is not a boolean");
  auto weighted = Get(arch, "weighted_pooling").try_cast<ffi::String>();
  if (bot.size() < 2 || top.empty()) throw Error("manifest.json: arch has too few MLP layers");
  const int64_t fea = static_cast<int64_t>(rows.size()) + 1;
  auto optional_int = [&arch](const char* key) -> int64_t {   // as Arch's defaults: 0
    auto it = arch.find(ffi::String(key));
    return it == arch.end() ? 0 : Int((*it).second, std::string("arch.") + key);
  };
  auto optional_ints = [&arch](const char* key) -> std::vector<int64_t> {   // default: none
    auto it = arch.find(ffi::String(key));
    return it == arch.end() ? std::vector<int64_t>{} : Ints((*it).second, std::string("arch.") + key);
  };
  // As Arch.top_input_width: dot, projection (the two branches' F1 x F2 products after the
  // dense features), and cat or dcn (the concatenated features; cross layers keep the width).
  std::vector<int64_t> branch1 = optional_ints("proj_branch1"), branch2 = optional_ints("proj_branch2");
  int64_t top_in = fea * bot.back();
  if (op == "dot")
    top_in = (*itself ? fea * (fea + 1) / 2 : fea * (fea - 1) / 2) + bot.back();
  else if (op == "projection" && !branch1.empty() && !branch2.empty() && dim > 0)
    top_in = dim + (branch1.back() / dim) * (branch2.back() / dim);
  top.insert(top.begin(), top_in);
  std::map<std::string, std::vector<int64_t>> shapes;
  const int64_t layers = optional_int("dcn_layers"), rank = optional_int("dcn_low_rank");
  for (int64_t l = 0; l < layers; ++l) {   // as Arch.weight_shapes
    const std::string n = std::to_string(l);
    shapes["cross_l.W_kernels." + n] = {top_in, rank};
    shapes["cross_l.V_kernels." + n] = {rank, top_in};
    shapes["cross_l.bias." + n] = {top_in};
  }
  for (size_t k = 0; k < rows.size(); ++k) {
    shapes["emb_l." + std::to_string(k) + ".weight"] = {rows[k], dim};
    if (weighted && std::string(*weighted) == "learned")
      shapes["v_W_l." + std::to_string(k)] = {rows[k]};
  }
  for (auto* branch : {&branch1, &branch2})   // as Arch.proj_widths: the features first
    if (!branch->empty()) branch->insert(branch->begin(), fea * bot.back());
  for (const auto& mlp : {std::make_pair(std::string("bot_l"), bot), std::make_pair(std::string("top_l"), top),
                          std::make_pair(std::string("proj_l1"), branch1),
                          std::make_pair(std::string("proj_l2"), branch2)})
    for (size_t i = 0; i + 1 < mlp.second.size(); ++i) {
      std::string layer = mlp.first + "." + std::to_string(2 * i);
      shapes[layer + ".weight"] = {mlp.second[i + 1], mlp.second[i]};
      shapes[layer + ".bias"] = {mlp.second[i + 1]};
    }
  return shapes;
}

/*! \brief TVM runtime's global function ``name`` (the wheel ships no runtime headers beyond
 *  tvm-ffi's, so tensors on a device are made and copied through these, as TVM's Python does). */
ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) throw Error(std::string("the TVM runtime lacks ") + name);
  return *f;
}

/*! \brief Ask for 2 MB pages under the whole pages of a large host buffer not yet written (a
 *  table lookup is a random read: with 4 KB pages it misses the TLB too, as
 *  dlrmc.artifact.read_weights says). Only advice: where the kernel declines, nothing changes. */
void AdviseHugePages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t page = 4096, lo = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1),
                  hi = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(page - 1);
  if (bytes >= (size_t{2} << 20) && hi > lo)
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

/*! \brief A tensor on ``dev`` holding ``bytes`` of host ``data``. */
Tensor Make(const std::vector<int64_t>& shape, DLDataType dtype, const void* data, size_t bytes,
            DLDevice dev) {
  static const ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
  static const ffi::Function copy = Global("runtime.TVMTensorCopyFromBytes");
  Tensor t = alloc(ffi::Shape(shape), dtype, dev, ffi::Optional<ffi::String>()).cast<Tensor>();
  if (dev.device_type == kDLCPU) AdviseHugePages(t.data_ptr(), bytes);
  if (bytes) copy(t, const_cast<void*>(data), static_cast<int64_t>(bytes));
  return t;
}

/*! \brief Why code for device ``name`` (DLPack type ``type``, not the host) cannot run here,
 *  or "" (as dlrmc.runtime.devices.device_unavailable): loads TVM's runtime for it, the
 *  sidecar library libtvm_runtime_NAME.so beside libtvm_runtime.so, when not loaded. */
std::string DeviceUnavailable(const std::string& name, int type) {
  if (!ffi::Function::GetGlobal("device_api." + name).has_value()) {
    std::string lib = "libtvm_runtime_" + name + ".so";
    if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      std::string first = dlerror();
#ifdef DLRMC_TVM_LIB_DIR
      std::string path = std::string(DLRMC_TVM_LIB_DIR) + "/" + lib;
      if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL))
#endif
        return "TVM's " + name + " runtime (" + lib + ") does not load: " + first;
    }
  }
  if (!ffi::Function::GetGlobal("device_api." + name).has_value())
    return "TVM's " + name + " runtime has no device API";
  constexpr int kExist = 0;  // TVM's DeviceAttrKind
  bool exist = Global("runtime.GetDeviceAttr")(type, 0, kExist).cast<int64_t>() != 0;
  return exist ? "" : "no " + name + " device found";
}

}  // namespace

struct Model::Impl {
  std::string dir;
  DLDevice dev{kDLCPU, 0};
  int64_t num_dense = 0;
  bool logit_output = false;  // arch.output "logit": the model ends in logits
  std::vector<int64_t> rows;
  ffi::Optional<ffi::Module> vm;  // set by the constructor
  ffi::Function main;
  std::map<int64_t, ffi::Function> buckets;
  std::vector<Tensor> weights;  // after transform_params: what main takes after the inputs
  mutable std::mutex mu;         // one VM: one Predict at a time

  std::vector<float> Run(const ffi::Function& fn, int64_t b, const float* dense,
                         const std::vector<int64_t>& idx, const std::vector<int64_t>& off) const;
};

Model::Model(const std::string& artifact_dir, bool verify) : impl_(new Impl) {
  Impl& m = *impl_;
  m.dir = artifact_dir;
  const std::string raw = ReadFile(artifact_dir + "/manifest.json");
  // A manifest nests a few levels; a deeper one would overflow the parser's stack.
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < raw.size(); ++i) {
    char c = raw[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  if (deepest > kMaxDepth)
    throw Error(artifact_dir + "/manifest.json is corrupt: nested " + std::to_string(deepest) +
                " levels deep (a manifest nests at most " + std::to_string(kMaxDepth) + ")");
  ffi::String err;
  json::Value parsed = json::Parse(raw, &err);
  if (!err.empty()) throw Error(artifact_dir + "/manifest.json is corrupt: " + std::string(err));
  json::Object man = Obj(parsed, "the manifest");
  if (Str(Get(man, "format"), "format") != kFormat)
    throw Error(artifact_dir + " is not a dlrmc artifact");
  json::Value version = Get(man, "format_version");
  if (version.type_index() != ffi::TypeIndex::kTVMFFIInt ||
      version.cast<int64_t>() != kFormatVersion)
    throw Error(artifact_dir + " has format version " + std::string(json::Stringify(version)) +
                "; this runner reads version " + std::to_string(kFormatVersion) +
                ": recompile the model with this dlrmc");
  // manifest.sha256 covers the manifest (sha256sum's format: the digest comes first).
  std::string recorded;
  {
    std::ifstream f(artifact_dir + "/manifest.sha256");
    if (!f) throw Error(artifact_dir + ": manifest.sha256 is missing");
    f >> recorded;
  }
  if (recorded != Sha256(raw))
    throw Error(artifact_dir + "/manifest.json does not match manifest.sha256: the manifest "
                "was changed or damaged after it was written");
  // The device, as the target's backend recorded it (dlrmc.runtime.devices.device_for).
  json::Object target = Obj(Get(man, "target"), "target");
  json::Object requires = Obj(Get(target, "requires"), "target.requires");
  std::string device = Str(Get(requires, "device"), "target.requires.device");
  json::Value type = Get(requires, "device_type");
  if (type.type_index() != ffi::TypeIndex::kTVMFFIInt)
    throw Error("manifest.json: target.requires.device_type must be int");
  m.dev = DLDevice{static_cast<DLDeviceType>(type.cast<int64_t>()), 0};
  if (m.dev.device_type != kDLCPU) {
    std::string needs;
    for (const auto& kv : requires) {
      std::string key = kv.first.cast<ffi::String>();
      auto text = kv.second.try_cast<ffi::String>();
      if (key != "device" && key != "device_type")
        needs += (needs.empty() ? "" : ", ") + key + " " +
                 (text ? std::string(*text) : std::string(json::Stringify(kv.second)));
    }
    std::string why = DeviceUnavailable(device, static_cast<int>(m.dev.device_type));
    if (!why.empty())
      throw Error(artifact_dir + " was built for " + device +
                  (needs.empty() ? "" : " (" + needs + ")") + " and cannot run here: " + why);
  }
  auto machine_it = requires.find(ffi::String("machine"));
  std::string want_machine;
  if (machine_it != requires.end()) {
    std::string want = want_machine = Str((*machine_it).second, "machine");
    utsname u{};
    uname(&u);
    std::string have = u.machine;
    if (want != have && !(want == "aarch64" && have == "arm64"))
      throw Error("the artifact was built for " + want + "; this machine is " + have);
  }
  auto flags_it = requires.find(ffi::String("cpu_flags"));
  std::set<std::string> have_flags = CpuFlags(want_machine == "aarch64");
  if (flags_it != requires.end() && !have_flags.empty()) {  // as dlrmc.runtime.model.check_cpu
    std::string missing;
    auto flags = (*flags_it).second.try_cast<json::Array>();
    if (!flags) throw Error("manifest.json: target.requires.cpu_flags is not a list");
    for (const auto& f : *flags) {
      std::string flag = Str(f, "a cpu flag");
      if (!have_flags.count(flag)) missing += (missing.empty() ? "" : ", ") + flag;
    }
    if (!missing.empty())
      throw Error("code for this target needs CPU features this CPU lacks: " + missing +
                  " (compile with a --target for this CPU, e.g. the default host, to run here)");
  }
  json::Object arch = Obj(Get(man, "arch"), "arch");
  m.num_dense = Ints(Get(arch, "mlp_bot"), "arch.mlp_bot").at(0);
  auto output_it = arch.find(ffi::String("output"));
  m.logit_output = output_it != arch.end() && Str((*output_it).second, "arch.output") == "logit";
  m.rows = Ints(Get(arch, "embedding_sizes"), "arch.embedding_sizes");

  // Files: plain names inside the artifact, regular files of the listed size and digest (the
  // weights file's digest is checked on the one read of it below).
  json::Object wspec = Obj(Get(man, "weights"), "weights");
  std::string wfile = PlainName(Get(wspec, "file"), "weights.file");
  std::string weights_digest;
  json::Object files = Obj(Get(man, "files"), "files");
  std::map<std::string, int64_t> sizes;
  for (const auto& kv : files) {
    std::string name = PlainName(kv.first, "files entry");
    json::Object entry = Obj(kv.second, "files." + name);
    int64_t bytes = Int(Get(entry, "bytes"), "files." + name + ".bytes");
    std::string path = artifact_dir + "/" + name;
    struct stat st{};
    if (lstat(path.c_str(), &st) != 0) throw Error("artifact file " + path + " is missing");
    if (!S_ISREG(st.st_mode))
      throw Error("artifact file " + path + " is not a plain file (a link or a directory)");
    if (st.st_size != bytes)
      throw Error("artifact file " + path + " is " + std::to_string(st.st_size) +
                  " bytes, the manifest says " + std::to_string(bytes) + " (truncated or corrupt)");
    if (verify) {
      std::string digest = Str(Get(entry, "sha256"), "files." + name + ".sha256");
      if (name == wfile)
        weights_digest = digest;
      else if (Sha256(ReadFile(path)) != digest)
        throw Error("artifact file " + path + " is corrupt (sha256 mismatch)");
    }
    sizes[name] = bytes;
  }
  if (!sizes.count("model.so")) throw Error("manifest.json: files does not list model.so");
  if (!sizes.count(wfile))
    throw Error("manifest.json: weights.file '" + wfile + "' is not listed under files");

  // The weight index: the writer's layout exactly, and the arch's weights.
  auto tensors = Get(wspec, "tensors").try_cast<json::Array>();
  if (!tensors) throw Error("manifest.json: weights.tensors is not a list");
  std::map<std::string, std::vector<int64_t>> want = WeightShapes(arch);
  struct Spec { std::vector<int64_t> shape; DLDataType dtype; int64_t offset, nbytes; };
  std::vector<Spec> specs;
  int64_t pos = 0;
  for (const auto& t : *tensors) {
    json::Object spec = Obj(t, "a weight");
    std::string name = Str(Get(spec, "name"), "weight name");
    Spec w{Ints(Get(spec, "shape"), name + " shape"),
           ffi::StringToDLDataType(Str(Get(spec, "dtype"), name + " dtype")),
           Int(Get(spec, "offset"), name + " offset"), Int(Get(spec, "nbytes"), name + " nbytes")};
    int64_t count = 1;
    for (int64_t d : w.shape) {
      if (d < 0) throw Error("manifest.json: " + name + " has a negative size");
      count *= d;
    }
    pos += (kAlign - pos % kAlign) % kAlign;
    if (w.offset != pos || w.nbytes != count * ((w.dtype.bits * w.dtype.lanes + 7) / 8))
      throw Error("manifest.json: " + name + "'s offset or size is not the layout's "
                  "(a tampered or corrupt index)");
    pos += w.nbytes;
    auto it = want.find(name);
    if (it == want.end()) throw Error("manifest.json: the weights do not match arch: " + name +
                                      " unexpected");
    bool table = name.rfind("emb_l.", 0) == 0;
    bool is_f32 = w.dtype.code == kDLFloat && w.dtype.bits == 32 && w.dtype.lanes == 1;
    bool is_u8 = w.dtype.code == kDLUInt && w.dtype.bits == 8 && w.dtype.lanes == 1;
    if (!(is_f32 || (table && is_u8)) ||   // float32; a table may be uint8 (quantised rows)
        (table && (w.shape.empty() || w.shape[0] != it->second[0])) ||
        (is_f32 && w.shape != it->second))
      throw Error("manifest.json: weight " + name + " does not have the dtype and shape arch "
                  "says");
    want.erase(it);
    specs.push_back(w);
  }
  if (!want.empty()) throw Error("manifest.json: the weights do not match arch: " +
                                 want.begin()->first + " missing");
  if (pos != sizes[wfile])
    throw Error("manifest.json: the weight index covers " + std::to_string(pos) + " bytes, " +
                wfile + " is listed with " + std::to_string(sizes[wfile]));

  std::string lib = artifact_dir + "/model.so";
  // The VM function a manifest field names, or an Error naming the field.
  auto vm_function = [](const ffi::Module& vm, const json::Value& name, const std::string& field) {
    auto fn = vm->GetFunction(Str(name, field));
    if (!fn.has_value())
      throw Error("manifest.json: " + field + " \"" + Str(name, field) +
                  "\" is not a function of model.so");
    return *fn;
  };
  // Each entry the manifest names, run once below: its field, name, function and batch.
  struct EntryCheck {
    std::string field, name;
    ffi::Function fn;
    int64_t batch;
  };
  std::vector<EntryCheck> checks;
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
    m.main = vm_function(vm, Get(man, "entry"), "entry");
    json::Object buckets = Obj(Get(man, "buckets"), "buckets");
    for (const auto& kv : buckets) {
      std::string key = std::string(kv.first.cast<ffi::String>());
      if (key.empty() || key.size() > 9 ||
          key.find_first_not_of("0123456789") != std::string::npos ||
          std::stoll(key) < 1 || std::stoll(key) > kMaxBucket)
        throw Error("manifest.json: buckets must map batch sizes (1 to " +
                    std::to_string(kMaxBucket) + ") to entry names, got '" + key + "'");
      const int64_t b = std::stoll(key);
      m.buckets[b] = vm_function(vm, kv.second, "buckets." + key);
      checks.push_back({"buckets." + key, Str(kv.second, "buckets." + key), m.buckets[b], b});
    }
    int64_t any = 2;   // the any-batch entry runs a batch no bucket has
    while (m.buckets.count(any)) ++any;
    checks.push_back({"entry", Str(Get(man, "entry"), "entry"), m.main, any});
  } catch (const ffi::Error& e) {
    throw Error("cannot load " + lib + ": " + e.what());
  }

  // Weights: each tensor at its offset, then transform_params once.
  std::string blob = ReadFile(artifact_dir + "/" + wfile);
  if (static_cast<int64_t>(blob.size()) != pos)
    throw Error(wfile + " changed while it was read");
  if (verify && Sha256(blob) != weights_digest)
    throw Error("artifact file " + artifact_dir + "/" + wfile + " is corrupt (sha256 mismatch)");
  ffi::Array<Tensor> raw_weights;
  for (const Spec& w : specs)
    raw_weights.push_back(Make(w.shape, w.dtype, blob.data() + w.offset, w.nbytes, m.dev));
  ffi::Function transform = vm_function(m.vm.value(), Get(man, "transform_params"),
                                        "transform_params");
  auto packed = transform(raw_weights).cast<ffi::Array<ffi::Any>>();
  for (const auto& w : packed) m.weights.push_back(w.cast<Tensor>());

  // Every entry once on an empty batch of its size (zero features, empty bags: no table row
  // read), as the Python runtime's load does: a bucket or entry that names another function
  // of the library is refused here, naming the field, not at the first batch.
  const int64_t T = static_cast<int64_t>(m.rows.size());
  for (const EntryCheck& c : checks) {
    std::vector<float> dense(c.batch * m.num_dense, 0.0f);
    std::vector<int64_t> idx, off(T * c.batch + 1, 0);
    try {
      m.Run(c.fn, c.batch, dense.data(), idx, off);
    } catch (const std::exception& e) {
      std::string why = e.what();
      throw Error("manifest.json: " + c.field + " \"" + c.name + "\" does not run a batch of " +
                  std::to_string(c.batch) + ": " + why.substr(0, why.find('\n')).substr(0, 300));
    }
  }
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
                                    const std::vector<int64_t>& idx,
                                    const std::vector<int64_t>& off) const {
  std::vector<ffi::Any> args;
  args.push_back(Make({b, num_dense}, DLDataType{kDLFloat, 32, 1}, dense,
                      sizeof(float) * b * num_dense, dev));
  for (const auto* a : {&idx, &off})
    args.push_back(Make({static_cast<int64_t>(a->size())}, DLDataType{kDLInt, 64, 1}, a->data(),
                        sizeof(int64_t) * a->size(), dev));
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

Batch Batch::FromReference(std::vector<float> dense_x, int64_t batch,
                           const std::vector<int64_t>& lS_o,
                           const std::vector<std::vector<int64_t>>& lS_i) {
  const int64_t T = static_cast<int64_t>(lS_i.size());
  if (batch < 1 || static_cast<int64_t>(lS_o.size()) != T * batch)
    throw Error("lS_o must have shape [" + std::to_string(T) + ", " + std::to_string(batch) +
                "] (tables, batch): got " + std::to_string(lS_o.size()) + " values");
  Batch out{batch, std::move(dense_x), {}, {}};
  for (int64_t k = 0; k < T; ++k) {
    const int64_t* o = lS_o.data() + k * batch;
    const int64_t n = static_cast<int64_t>(lS_i[k].size()), base = out.indices.size();
    if (o[0] != 0 || o[batch - 1] > n)
      throw Error("lS_o[" + std::to_string(k) + "] must start at 0 and end within lS_i[" +
                  std::to_string(k) + "] (" + std::to_string(n) + " indices)");
    for (int64_t b = 0; b < batch; ++b) out.offsets.push_back(base + o[b]);
    out.indices.insert(out.indices.end(), lS_i[k].begin(), lS_i[k].end());
  }
  out.offsets.push_back(static_cast<int64_t>(out.indices.size()));
  return out;
}

Batch Batch::FromLengths(std::vector<float> dense_x, int64_t batch, std::vector<int64_t> values,
                         const std::vector<int64_t>& lengths) {
  Batch out{batch, std::move(dense_x), std::move(values), {0}};
  for (size_t p = 0; p < lengths.size(); ++p) {
    if (lengths[p] < 0)
      throw Error("lengths[" + std::to_string(p) + "] = " + std::to_string(lengths[p]) +
                  " is negative");
    out.offsets.push_back(out.offsets.back() + lengths[p]);
  }
  return out;
}

std::vector<float> Model::Predict(const Batch& in, bool logits) const {
  const Impl& m = *impl_;
  if (logits && !m.logit_output)
    throw Error("this model computes click probabilities (it ends in a sigmoid), not logits");
  const int64_t B = in.batch, T = num_tables();
  const int64_t N = static_cast<int64_t>(in.indices.size());
  // Validation, as dlrmc.runtime.validate.check_jagged.
  if (B < 1) throw Error("the batch must have at least 1 row");
  if (static_cast<int64_t>(in.dense_x.size()) != B * m.num_dense)
    throw Error("dense_x must have shape [" + std::to_string(B) + ", " +
                std::to_string(m.num_dense) + "]: got " + std::to_string(in.dense_x.size()) +
                " values");
  if (static_cast<int64_t>(in.offsets.size()) != T * B + 1)
    throw Error("offsets must have shape [" + std::to_string(T * B + 1) +
                "] (tables x batch + 1): got " + std::to_string(in.offsets.size()) + " values");
  const std::vector<int64_t>& o = in.offsets;
  if (o[0] != 0) throw Error("offsets[0] is " + std::to_string(o[0]) +
                             "; the first bag must start at 0");
  for (int64_t p = 1; p <= T * B; ++p)
    if (o[p] < o[p - 1])
      throw Error("offsets decreases at position " + std::to_string(p) + " (table " +
                  std::to_string(p / B) + ", bag " + std::to_string(p % B) +
                  "); offsets must be non-decreasing");
  if (o[T * B] != N)
    throw Error("offsets[" + std::to_string(T * B) + "] = " + std::to_string(o[T * B]) +
                ", but indices holds " + std::to_string(N) + " values; the last offset is "
                "their count");
  for (int64_t k = 0; k < T; ++k)
    for (int64_t p = o[k * B]; p < o[(k + 1) * B]; ++p) {
      const int64_t v = in.indices[p];
      if (v < 0 || v >= m.rows[k])
        throw Error("indices[" + std::to_string(p) + "] = " + std::to_string(v) + " (table " +
                    std::to_string(k) + ", position " + std::to_string(p - o[k * B]) +
                    ") is out of range for table " + std::to_string(k) + " with " +
                    std::to_string(m.rows[k]) + " rows");
    }
  std::lock_guard<std::mutex> lock(m.mu);
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
    std::vector<int64_t> idx, off;
    for (int64_t k = 0; k < T; ++k) {
      const int64_t lo = o[k * B + start], hi = o[k * B + start + rows];
      const int64_t base = static_cast<int64_t>(idx.size());
      for (int64_t b = 0; b < rows; ++b) off.push_back(o[k * B + start + b] - lo + base);
      idx.insert(idx.end(), in.indices.begin() + lo, in.indices.begin() + hi);
      off.resize(off.size() + size - rows, static_cast<int64_t>(idx.size()));
    }
    off.push_back(static_cast<int64_t>(idx.size()));
    const ffi::Function& fn = piece.second ? m.buckets.at(piece.second) : m.main;
    std::vector<float> part = m.Run(fn, size, dense.data(), idx, off);
    out.insert(out.end(), part.begin(), part.begin() + rows);
    start += rows;
  }
  if (m.logit_output && !logits)
    for (float& v : out) v = 1.0f / (1.0f + std::exp(-v));
  return out;
}

}  // namespace dlrmc
