/*!
 * \file dlrmc_runtime.h
 * \brief Run a dlrmc artifact (model.so + weights.bin + manifest.json) from C++ with the TVM
 *        runtime alone: no Python, no torch, no compiler.
 *
 * The C++ twin of dlrmc.runtime (Python): the same artifact checks (format and version, the
 * manifest against manifest.sha256, every field read, plain file names inside the artifact,
 * file sizes and, with ``verify``, sha256 digests, the weight layout, the weights against the
 * architecture, target kind, machine and CPU features), the same input validation (shapes,
 * offsets that start at 0, never decrease and stay within the indices, every index inside its
 * table) and the same batch plan (static-batch buckets, padding at most 25%, splitting above
 * the largest bucket, the any-batch entry otherwise). Predict may be called from several
 * threads; calls on one Model run one at a time.
 *
 * CUDA artifacts run on the first GPU: TVM's CUDA runtime (libtvm_runtime_cuda.so, beside
 * libtvm_runtime.so) is loaded when one is opened; inputs are copied to the GPU and the
 * predictions back. Without a driver or GPU the constructor throws Error saying which.
 */
#ifndef DLRMC_RUNTIME_H_
#define DLRMC_RUNTIME_H_

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace dlrmc {

/*! \brief A bad artifact or a batch that does not fit it; what() names the problem. */
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/*! \brief One batch in the artifact's own, flat layout (FBGEMM's table-batched bags):
 *  ``indices`` holds every table's indices, table-major; bag b of table t spans
 *  indices[offsets[t*B + b], offsets[t*B + b + 1]). ``FromReference`` and ``FromLengths``
 *  build one from the reference layout and TorchRec's KeyedJaggedTensor layout. */
struct Batch {
  int64_t batch = 0;              //!< B
  std::vector<float> dense_x;     //!< [B, num_dense], row-major
  std::vector<int64_t> indices;   //!< [N]
  std::vector<int64_t> offsets;   //!< [T*B + 1]

  /*! \brief From lS_o ([T, B] bag starts, row-major) and lS_i (T index lists). */
  static Batch FromReference(std::vector<float> dense_x, int64_t batch,
                             const std::vector<int64_t>& lS_o,
                             const std::vector<std::vector<int64_t>>& lS_i);
  /*! \brief From values (key-major) and lengths ([T*B] bag sizes). */
  static Batch FromLengths(std::vector<float> dense_x, int64_t batch,
                           std::vector<int64_t> values, const std::vector<int64_t>& lengths);
};

class Model {
 public:
  /*! \brief Load an artifact directory; throws Error. ``verify``: check every file's sha256
   *  (sizes and the manifest's digest are checked always). */
  explicit Model(const std::string& artifact_dir, bool verify = true);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  int64_t num_dense() const;
  int64_t num_tables() const;
  const std::vector<int64_t>& table_rows() const;
  std::vector<int64_t> buckets() const;

  /*! \brief Validate a batch (throws Error naming the problem); return B click probabilities,
   *  or with ``logits`` the logits of a model that ends in them (TorchRec's DLRM). */
  std::vector<float> Predict(const Batch& batch, bool logits = false) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dlrmc

#endif  // DLRMC_RUNTIME_H_
