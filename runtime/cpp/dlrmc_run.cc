/*!
 * \file dlrmc_run.cc
 * \brief dlrmc_run ARTIFACT BATCH_DIR: predictions for one batch, one per line, from C++.
 *
 * BATCH_DIR holds raw little-endian arrays: dense_x.bin (float32 [B, num_dense]), lS_o.bin
 * (int64 [T, B]) and lS_i_0.bin .. lS_i_{T-1}.bin (int64). Errors go to stderr with exit
 * status 2. Threads: TVM_NUM_THREADS.
 */
#include <cstdio>
#include <fstream>
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

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR BATCH_DIR\n", argv[0]);
    return 2;
  }
  try {
    dlrmc::Model model(argv[1]);
    const std::string dir = argv[2];
    dlrmc::Batch batch;
    batch.dense_x = ReadArray<float>(dir + "/dense_x.bin");
    if (batch.dense_x.size() % model.num_dense())
      throw dlrmc::Error("dense_x.bin does not hold whole rows of " +
                         std::to_string(model.num_dense()) + " features");
    batch.batch = static_cast<int64_t>(batch.dense_x.size()) / model.num_dense();
    batch.offsets = ReadArray<int64_t>(dir + "/lS_o.bin");
    for (int64_t k = 0; k < model.num_tables(); ++k)
      batch.indices.push_back(ReadArray<int64_t>(dir + "/lS_i_" + std::to_string(k) + ".bin"));
    for (float p : model.Predict(batch)) std::printf("%.9g\n", p);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dlrmc_run: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
