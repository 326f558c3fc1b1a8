-- tessera — `local T = require 'tessera'`
-- Tensors, their math and the runtime controls. The modules below each add their part to the
-- Tensor methods (tessera.core.Tensor) and to this namespace.
local core = require 'tessera.core'
require 'tessera.tensor'
require 'tessera.runtime'
require 'tessera.autograd'
require 'tessera.random'
require 'tessera.linalg'
require 'tessera.indexing'
require 'tessera.reduce'
-- mixed precision, CUDA controls, data, images, masks, files, functional ops, optimizers, nn, models
require 'tessera.autocast'
require 'tessera.cuda'
require 'tessera.data'
require 'tessera.image'
require 'tessera.masks'
require 'tessera.serialize'
require 'tessera.functional'
require 'tessera.spatial'
require 'tessera.optim'
require 'tessera.attention'
require 'tessera.nn'
require 'tessera.models'
core.finish_metatype()
return core.T
