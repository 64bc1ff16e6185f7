// Argument checks and sizes of the masked CRF operators, shared by the CPU and CUDA files.
//
// The public function (attenscribble_ops.masked_crf_loss) validates everything a user can get
// wrong and raises ValueError/TypeError; these TORCH_CHECKs only guard the operators against a
// direct call with inconsistent arguments, so that no kernel ever indexes out of bounds.
// Only ATen core headers: the CUDA file includes this too and must compile with plain nvcc.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace attenscribble_ops {

// One masked CRF call. A 2-D input is a 3-D problem with depth 1 and rd = 0, so every kernel
// has a single (z, y, x) code path.
struct CrfGeometry {
  int64_t batch = 0, classes = 0, channels = 0;  // channels: image channels F (0 without image)
  int64_t depth = 1, height = 0, width = 0;
  int64_t rd = 0, rh = 0, rw = 0;
  double sd = 1.0, sh = 1.0, sw = 1.0;  // spacing per axis
  int64_t kernels = 0;                  // descriptors: rows of the (K, 2 + F) table
  bool zero_padding = true;
  bool has_image = false, has_mask_dst = false, has_mask_src = false, has_compat = false;

  int64_t plane() const { return height * width; }
  int64_t volume() const { return depth * height * width; }
  // Window size in floating point: radii up to 2^30 are legal and only the border count uses it.
  double window() const { return double(2 * rd + 1) * double(2 * rh + 1) * double(2 * rw + 1); }
  // B with the source-role mask: present whenever a mask makes the two roles differ.
  bool needs_second_role() const { return has_mask_dst || has_mask_src; }
};

inline at::ScalarType crf_accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

namespace detail {

inline void check_side_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& probs,
                              int64_t dim1) {
  TORCH_CHECK(t.dim() == probs.dim(), op, ": ", name, " must have ", probs.dim(), " dimensions, got ", t.dim());
  TORCH_CHECK(t.device() == probs.device(), op, ": ", name, " is on ", t.device(), " but probs is on ",
              probs.device());
  TORCH_CHECK(t.scalar_type() == crf_accumulate_type(probs.scalar_type()), op, ": ", name, " must have dtype ",
              crf_accumulate_type(probs.scalar_type()), " (the accumulate dtype of probs), got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == probs.size(0) && (dim1 < 0 || t.size(1) == dim1), op, ": ", name,
              " has shape ", t.sizes(), ", incompatible with probs ", probs.sizes());
  for (int64_t d = 2; d < probs.dim(); ++d) {
    TORCH_CHECK(t.size(d) == probs.size(d), op, ": ", name, " must have the spatial size of probs ",
                probs.sizes(), ", got ", t.sizes());
  }
}

}  // namespace detail

inline CrfGeometry masked_crf_geometry(const char* op, const at::Tensor& probs,
                                       const std::optional<at::Tensor>& image,
                                       const std::optional<at::Tensor>& mask_dst,
                                       const std::optional<at::Tensor>& mask_src,
                                       const std::optional<at::Tensor>& compat, c10::ArrayRef<double> table,
                                       c10::IntArrayRef radius, c10::ArrayRef<double> spacing,
                                       bool zero_padding) {
  TORCH_CHECK(probs.dim() == 4 || probs.dim() == 5, op, ": probs must be (B, C, H, W) or (B, C, D, H, W), got ",
              probs.sizes());
  TORCH_CHECK(at::isFloatingType(probs.scalar_type()), op, ": probs must be floating point, got ",
              probs.scalar_type());
  for (int64_t d = 0; d < probs.dim(); ++d) {
    TORCH_CHECK(probs.size(d) > 0, op, ": probs must not be empty, got ", probs.sizes());
  }
  const int64_t nd = probs.dim() - 2;
  CrfGeometry g;
  g.batch = probs.size(0);
  g.classes = probs.size(1);
  g.depth = nd == 3 ? probs.size(2) : 1;
  g.height = probs.size(-2);
  g.width = probs.size(-1);
  g.zero_padding = zero_padding;
  if (image.has_value()) {
    detail::check_side_tensor(op, "image", *image, probs, -1);
    g.has_image = true;
    g.channels = image->size(1);
  }
  if (mask_dst.has_value()) {
    detail::check_side_tensor(op, "mask_dst", *mask_dst, probs, 1);
    g.has_mask_dst = true;
  }
  if (mask_src.has_value()) {
    detail::check_side_tensor(op, "mask_src", *mask_src, probs, 1);
    g.has_mask_src = true;
  }
  if (compat.has_value()) {
    TORCH_CHECK(compat->dim() == 2 && compat->size(0) == g.classes && compat->size(1) == g.classes, op,
                ": compat must be (C, C) with C = ", g.classes, ", got ", compat->sizes());
    TORCH_CHECK(compat->device() == probs.device(), op, ": compat must be on the device of probs");
    TORCH_CHECK(compat->scalar_type() == crf_accumulate_type(probs.scalar_type()), op,
                ": compat must have the accumulate dtype of probs, got ", compat->scalar_type());
    g.has_compat = true;
  }
  const int64_t row = 2 + g.channels;
  TORCH_CHECK(!table.empty() && static_cast<int64_t>(table.size()) % row == 0, op,
              ": table must hold K rows of 2 + F = ", row, " values (weight, 1/sigma_xy, 1/sigma_image per channel), "
              "got ", table.size(), " values");
  for (const double v : table) {
    TORCH_CHECK(std::isfinite(v), op, ": table values must be finite");
  }
  g.kernels = static_cast<int64_t>(table.size()) / row;
  for (int64_t k = 0; k < g.kernels; ++k) {
    for (int64_t j = 1; j < row; ++j) {
      TORCH_CHECK(table[k * row + j] >= 0, op, ": inverse sigmas in the table must be >= 0");
    }
  }
  TORCH_CHECK(static_cast<int64_t>(radius.size()) == nd && static_cast<int64_t>(spacing.size()) == nd, op,
              ": radius and spacing need one value per spatial axis (", nd, "), got ", radius.size(), " and ",
              spacing.size());
  for (int64_t a = 0; a < nd; ++a) {
    // A radius beyond the image only adds out-of-image neighbours: kernels clip their loops to
    // the image and count the rest in closed form. The bound keeps index + radius far from int64 overflow.
    TORCH_CHECK(radius[a] >= 0 && radius[a] <= (int64_t{1} << 30), op, ": radius must be in [0, 2^30], got ",
                radius);
    TORCH_CHECK(std::isfinite(spacing[a]) && spacing[a] > 0, op, ": spacing must be finite and > 0, got ",
                spacing);
  }
  g.rd = nd == 3 ? radius[0] : 0;
  g.rh = radius[nd - 2];
  g.rw = radius[nd - 1];
  g.sd = nd == 3 ? spacing[0] : 1.0;
  g.sh = spacing[nd - 2];
  g.sw = spacing[nd - 1];
  return g;
}

// The checked sizes and the tensors as the kernels read them: contiguous (a copy only for a
// non-contiguous input), undefined where an optional input is absent.
struct CrfInputs {
  CrfGeometry geo;
  at::Tensor probs, image, mask_dst, mask_src, compat;
};

inline CrfInputs masked_crf_inputs(const char* op, const at::Tensor& probs, const std::optional<at::Tensor>& image,
                                   const std::optional<at::Tensor>& mask_dst,
                                   const std::optional<at::Tensor>& mask_src,
                                   const std::optional<at::Tensor>& compat, c10::ArrayRef<double> table,
                                   c10::IntArrayRef radius, c10::ArrayRef<double> spacing, bool zero_padding) {
  const auto contiguous = [](const std::optional<at::Tensor>& t) { return t ? t->contiguous() : at::Tensor(); };
  CrfInputs in;
  in.geo = masked_crf_geometry(op, probs, image, mask_dst, mask_src, compat, table, radius, spacing, zero_padding);
  in.probs = probs.contiguous();
  in.image = contiguous(image);
  in.mask_dst = contiguous(mask_dst);
  in.mask_src = contiguous(mask_src);
  in.compat = contiguous(compat);
  return in;
}

}  // namespace attenscribble_ops
