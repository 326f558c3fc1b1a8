-- tessera.autocast — mixed precision, as torch.autocast (thread-local; see ts_set_autocast in
-- tessera.h for which ops cast what):
--   T.autocast('bfloat16', fn, ...)   → fn(...)'s results, run with autocast on; the previous
--                                       setting is restored afterwards, also when fn raises
--   T.autocast('float32', fn, ...)    → the same with autocast off (a float32 region inside one)
--   T.get_autocast()                  → 'bfloat16', 'float16' or 'float32' (off)
-- On CUDA devices products (matmul, linear, conv2d, attention) run in bfloat16 with float32
-- accumulation and their casts are recorded by autograd, so float32 parameters get float32
-- gradients; norms, softmax and losses run in float32. On the CPU autocast changes nothing: a
-- recipe written with it runs anywhere. Calling backward outside the region is the usual pattern.
local core = require 'tessera.core'
local C, T = core.C, core.T

-- The C setting for a dtype name: -1 (off) for float32.
local function setting(dtype)
  local id = core.dtype(dtype, 'autocast')
  if id == C.TS_F32 then return -1 end
  if id ~= C.TS_BF16 and id ~= C.TS_F16 then
    error(string.format("autocast: expected 'bfloat16', 'float16' or 'float32' (off), got '%s'", tostring(dtype)), 3)
  end
  return id
end

function T.autocast(dtype, fn, ...)
  if dtype == nil then error("autocast: expected a dtype ('bfloat16', 'float16' or 'float32')", 2) end
  if type(fn) ~= 'function' then error('autocast: expected a function to run, got ' .. type(fn), 2) end
  local previous = C.ts_set_autocast(setting(dtype))
  if previous == -2 then core.raise() end
  return core.restore_after(C.ts_set_autocast, previous, pcall(fn, ...))
end

function T.get_autocast()
  local id = C.ts_get_autocast()
  return id < 0 and 'float32' or core.dtype_names[id]
end

return T
