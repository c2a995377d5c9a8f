/*!
 * \file dlrmc_run.cc
 * \brief dlrmc_run ARTIFACT BATCH_DIR: predictions for one batch, one per line, from C++.
 *
 * BATCH_DIR holds raw little-endian arrays: dense_x.bin (float32 [B, num_dense]) and the sparse
 * features in one of three layouts: indices.bin + offsets.bin (int64 [N], [T*B+1]: the
 * artifact's own, FBGEMM's), values.bin + lengths.bin (int64 [N], [T*B]: TorchRec's
 * KeyedJaggedTensor), or lS_o.bin + lS_i_0.bin .. lS_i_{T-1}.bin (int64 [T, B], [N_k]: the
 * reference's). Errors go to stderr with exit status 2. Threads: TVM_NUM_THREADS.
 */
#include <cstdio>
#include <fstream>
#include <sys/stat.h>
#include <iterator>
#include <string>
#include <vector>

#include "dlrmc_runtime.h"

template <typename T>
static std::vector<T> ReadArray(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw dlrmc::Error("cannot read " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (bytes.size() % sizeof(T)) throw dlrmc::Error(path + ": size is not a whole number of values");
  std::vector<T> out(bytes.size() / sizeof(T));
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(out.data()));
  return out;
}

static bool Exists(const std::string& path) {
  struct stat st{};
  return stat(path.c_str(), &st) == 0;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR BATCH_DIR\n", argv[0]);
    return 2;
  }
  try {
    dlrmc::Model model(argv[1]);
    const std::string dir = argv[2];
    std::vector<float> dense = ReadArray<float>(dir + "/dense_x.bin");
    if (dense.size() % model.num_dense())
      throw dlrmc::Error("dense_x.bin does not hold whole rows of " +
                         std::to_string(model.num_dense()) + " features");
    const int64_t rows = static_cast<int64_t>(dense.size()) / model.num_dense();
    dlrmc::Batch batch;
    if (Exists(dir + "/indices.bin")) {
      batch = {rows, std::move(dense), ReadArray<int64_t>(dir + "/indices.bin"),
               ReadArray<int64_t>(dir + "/offsets.bin")};
    } else if (Exists(dir + "/values.bin")) {
      batch = dlrmc::Batch::FromLengths(std::move(dense), rows,
                                        ReadArray<int64_t>(dir + "/values.bin"),
                                        ReadArray<int64_t>(dir + "/lengths.bin"));
    } else {
      std::vector<std::vector<int64_t>> lS_i;
      for (int64_t k = 0; k < model.num_tables(); ++k)
        lS_i.push_back(ReadArray<int64_t>(dir + "/lS_i_" + std::to_string(k) + ".bin"));
      batch = dlrmc::Batch::FromReference(std::move(dense), rows,
                                          ReadArray<int64_t>(dir + "/lS_o.bin"), lS_i);
    }
    for (float p : model.Predict(batch)) std::printf("%.9g\n", p);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dlrmc_run: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
