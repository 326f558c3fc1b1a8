-- tessera.cuda — process-wide switches of the CUDA kernels (T.cuda is made by tessera.runtime).
--   T.cuda.allow_tf32()        → whether float32 products and convolutions may use TF32
--   T.cuda.allow_tf32(true)    → allows it (returns the previous setting); false forbids it (default)
-- The setting exists in every build, so a script that sets it runs on machines without CUDA too.
local core = require 'tessera.core'
local C, T = core.C, core.T

function T.cuda.allow_tf32(allow)
  if allow == nil then return C.ts_cuda_get_allow_tf32() ~= 0 end
  if type(allow) ~= 'boolean' then
    error(string.format('cuda.allow_tf32: expected a boolean, got %s', type(allow)), 2)
  end
  return C.ts_cuda_set_allow_tf32(allow and 1 or 0) ~= 0
end

return T
