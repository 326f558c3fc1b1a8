-- tessera.nn — modules in the style of Torch7's nn with PyTorch's names (T.nn).
--   T.nn.Module, Sequential, ModuleList, Identity, Parameter, Buffer (nn/module.lua)
--   T.nn.Linear, Conv2d, LayerNorm, BatchNorm2d, GroupNorm, GELU, ReLU, SiLU, Sigmoid, Tanh,
--   Dropout, DropPath, PixelShuffle, Flatten (nn/layers.lua)
--   T.nn.init: torch.nn.init's initializers (nn/weight_init.lua)
-- Layers call the functional ops in T.F.
local T = require 'tessera.core'.T

local nn = require 'tessera.nn.module'
nn.init = require 'tessera.nn.weight_init'
require 'tessera.nn.layers'(nn)

T.nn = nn
T.F = T.F or {}
return nn
