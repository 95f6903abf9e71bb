#pragma once
// pytorch_model.bin: the zip archive torch.save writes (PyTorch >= 1.6), read without Python.
//
// The archive holds one top folder `<top>/` with `data.pkl` (a pickle of the state_dict: an OrderedDict
// name -> torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)), and one
// `data/<key>` entry per storage with its raw little-endian bytes. Entries are stored, never compressed, so every
// storage is a zero-copy view into a memory map of the file; tensors that share a storage (tied embeddings) share
// its bytes. Only what state_dicts need is interpreted: any other pickle opcode or global, a compressed or
// malformed archive, or a tensor that does not fit its storage throws mamba3::Error naming the file and the
// entry, opcode or tensor at fault.
#include <string>

#include "io/safetensors.h"

namespace mamba3 {

// Reads every tensor of a torch.save zip archive, in the order the state_dict lists them.
// Storage types: FloatStorage, DoubleStorage, HalfStorage, BFloat16Storage, LongStorage, IntStorage.
// Contiguous tensors are views into the mapped file; non-contiguous ones (or storages whose bytes are not
// aligned to their element size) are copied.
NamedTensors read_torch_checkpoint(const std::string& path);

}  // namespace mamba3
