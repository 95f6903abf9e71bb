#pragma once
// The CUDA training engine (train/train_engine.h): parameters, gradient sum and AdamW moments stay on the device
// (GpuParamStore); the loss and gradient come from GpuLmTrainer; clipping and AdamW run as kernels over the flat
// buffers. The host TensorMap and AdamW it was made from are written only by sync_to_host (checkpoints, the end).
#include <memory>

#include "cuda/cuda_context.h"
#include "train/train_engine.h"

namespace mamba3::cuda {

std::unique_ptr<TrainEngine> cuda_train_engine(const ModelConfig& config, TensorMap& params, AdamW& optimizer,
                                               Precision precision);

// For TrainJob::engine.
TrainEngineFactory cuda_train_engine_factory(Precision precision);

}  // namespace mamba3::cuda
