// Precompiled header for every libtorch translation unit: the narrow set of libtorch headers sparsecl
// uses (not <torch/torch.h>, which pulls in every module, dataset and optimizer).
#pragma once
#include <ATen/ATen.h>
#include <torch/types.h>
#include <torch/nn/module.h>
#include <torch/nn/init.h>
#include <torch/autograd.h>
#include <torch/serialize.h>
#include <torch/utils.h>
