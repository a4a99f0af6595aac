// Declarations shared by the CPU (weighted_adv_loss.cpp) and CUDA (cuda/weighted_adv_loss.cu) kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace pwda_fast {

// TORCH_CHECKs the op's inputs (shape, dtype, device, label); the messages name the tensor and the rule.
void check_weighted_adv_loss_inputs(const at::Tensor& seg, const at::Tensor& disc,
                                    const std::optional<at::Tensor>& aux, double label);

}  // namespace pwda_fast
