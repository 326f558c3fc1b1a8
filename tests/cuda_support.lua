-- cuda_support.lua — what the CUDA parity specs share (tests/cuda_*_spec.lua): GPU-only tests that
-- are pending without a device, CPU/GPU comparison with per-dtype tolerances, the table of the
-- largest relative errors, random inputs with special values, non-contiguous views, and
-- gradients through autograd on both devices.
local T = require 'tessera'
local core = require 'tessera.core'
local S = require 'support'
local assert = require 'luassert' -- busted's assert (the spec environment's) from a module

local CS = {}

CS.has_gpu = T.cuda.is_available()
CS.device = 'cuda:0' -- where GPU results must live

-- `it` for a test that needs a GPU: pending (never passed) without one. busted's `it` and
-- `pending` live in the calling spec's environment.
function CS.it(name, fn)
  local env = getfenv(2)
  env.it(name, function()
    if not CS.has_gpu then env.pending('no CUDA device') return end
    fn()
  end)
end

CS.FLOATS = { 'float32', 'float64', 'float16', 'bfloat16' }
CS.NUMERIC = { 'float32', 'float64', 'float16', 'bfloat16', 'int64' }
CS.ALL_DTYPES = { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8', 'bool' }

-- atol + rtol * |cpu| per dtype, for results whose rounding may differ between the devices (a
-- different summation order, CUDA's libm); float16/bfloat16 results may then be a rounding step
-- apart. Integers, bools and pure data movement must be exact.
CS.TOLERANCE = {
  float32 = { 1e-5, 1e-6 }, float64 = { 1e-12, 1e-13 }, float16 = { 2e-3, 1e-4 }, bfloat16 = { 1.6e-2, 1e-5 },
  int64 = { 0, 0 }, int32 = { 0, 0 }, uint8 = { 0, 0 }, bool = { 0, 0 },
}

-- ---- the error table ------------------------------------------------------------------------------
local worst, case_order = {}, {}
local function record(case, column, rel)
  if not worst[case] then worst[case] = {}; case_order[#case_order + 1] = case end
  worst[case][column] = math.max(worst[case][column] or 0, rel)
end

-- Prints the largest relative error per case and dtype seen so far, then starts over.
function CS.report(title)
  if #case_order == 0 then return end
  local cols = CS.ALL_DTYPES
  local lines = { '', title .. ' — cuda vs cpu: largest relative error (0 = bit-identical, - = not run)',
                  string.format('%-26s' .. string.rep('%10s', #cols), 'case', unpack(cols)) }
  for _, case in ipairs(case_order) do
    local cells = {}
    for i, d in ipairs(cols) do
      local v = worst[case][d]
      cells[i] = v == nil and '-' or v == 0 and '0' or string.format('%.1e', v)
    end
    lines[#lines + 1] = string.format('%-26s' .. string.rep('%10s', #cols), case, unpack(cells))
  end
  io.stdout:write(table.concat(lines, '\n') .. '\n')
  worst, case_order = {}, {}
end

-- Asserts that a GPU result equals the CPU's: on cuda:0, same dtype and shape, NaNs and infinities
-- in the same places, finite values within tolerance (exactly when opts.exact). opts: exact,
-- rtol, atol (override the dtype's), column (the table's column, default the dtype).
function CS.check(case, got, want, opts)
  opts = opts or {}
  assert.equals(CS.device, got.device, case .. ': result device')
  assert.equals(want.dtype, got.dtype, case .. ': result dtype')
  assert.equals(tostring(want.shape), tostring(got.shape), case .. ': result shape')
  local dtype = want.dtype
  local rtol, atol = 0, 0
  if not opts.exact then
    rtol, atol = opts.rtol or CS.TOLERANCE[dtype][1], opts.atol or CS.TOLERANCE[dtype][2]
  end
  local g, n = core.host_values(got)
  local c = core.host_values(want)
  local rel = 0
  for i = 0, n - 1 do
    local x, y = g[i], c[i]
    local ok
    if y ~= y then ok = x ~= x
    elseif y == math.huge or y == -math.huge then ok = x == y
    else
      local err = math.abs(x - y)
      ok = err <= atol + rtol * math.abs(y)
      if ok and err > 0 then rel = math.max(rel, err / math.max(math.abs(y), 1e-300)) end
    end
    if not ok then
      error(string.format('%s (%s): element %d is %.17g on cuda, %.17g on cpu', case, dtype, i, x, y), 0)
    end
  end
  record((case:gsub(' %(.*%)$', '')), opts.column or dtype, rel)
end

-- ---- inputs -----------------------------------------------------------------------------------------
local numel = S.numel

-- A CPU tensor of `shape` (default {8, 12}) and dtype with values in [lo, hi] (default [-4, 4]).
-- Floats get NaN, infinities and signed zeros unless opts.specials == false; integers are
-- rounded (never 0 when opts.nonzero); bool is x > 0.
function CS.base(dtype, seed, shape, opts)
  opts = opts or {}
  shape = shape or { 8, 12 }
  local n = numel(shape)
  local flat = S.randoms(n, seed, opts.lo or -4, opts.hi or 4)
  local floating = core.is_floating(core.dtype(dtype))
  if floating and opts.specials ~= false and n >= 12 then
    local special = { 0 / 0, math.huge, -math.huge, 0, -0.0, 0.5, -2.5, 1, 2, -1 }
    for i, v in ipairs(special) do flat[(i * 7) % n + 1] = v end
  elseif not floating then
    for i = 1, n do
      flat[i] = math.floor(flat[i] * 5)
      if opts.nonzero and flat[i] == 0 then flat[i] = 7 end
    end
  end
  local t = T.tensor(S.nest(flat, shape), { dtype = 'float64' })
  if dtype == 'bool' then return t:gt(0) end
  return t:to(dtype)
end

-- Non-contiguous views of an [8, 12] tensor, applied alike on both devices.
CS.VIEWS = {
  { 'contiguous', function(t) return t end },
  { 'transposed', function(t) return t:t() end },
  { 'step-sliced', function(t) return t:slice(1, 1, nil, 3) end },
  { 'permuted 3-d', function(t) return t:view(2, 4, 12):permute(2, 0, 1) end },
  { 'broadcast', function(t) return t:select(0, 2):unsqueeze(0):expand(5, 12) end },
}

-- A CPU tensor of finite values in [lo, hi) (default [-1, 1)): the inputs of numeric kernels.
function CS.rand(dtype, seed, shape, lo, hi)
  return CS.base(dtype, seed, shape, { specials = false, lo = lo or -1, hi = hi or 1 })
end

-- The same values on both devices, seen through `view` (default: as they are).
function CS.pair(dtype, seed, view, shape, opts)
  local c = CS.base(dtype, seed, shape, opts)
  local g = c:cuda()
  view = view or function(t) return t end
  return view(c), view(g)
end

-- Fills a GPU tensor the op is about to write with values it must overwrite (NaN for floats).
function CS.poison(t)
  if core.is_floating(core.dtype(t.dtype)) then t:fill_(0 / 0) else t:fill_(t.dtype == 'bool' and 1 or 77) end
  return t
end

-- ---- gradients ------------------------------------------------------------------------------------
-- Runs fn(inputs...) on CPU leaves and on their GPU copies, backpropagates the same upstream
-- gradient (random, in the output's dtype) and compares the forward results and every input
-- gradient. inputs: CPU tensors (floating; each becomes a leaf that requires grad) or other values
-- passed as they are (a CPU tensor in `fixed` positions is moved to the GPU but gets no grad).
function CS.check_grad(case, fn, inputs, opts)
  opts = opts or {}
  local fixed = opts.fixed or {}
  local cpu_in, gpu_in = {}, {}
  for i, x in ipairs(inputs) do
    if T.is_tensor(x) then
      local c, g = x:clone(), x:cuda()
      if not fixed[i] then
        c:requires_grad_(true)
        g:requires_grad_(true)
      end
      cpu_in[i], gpu_in[i] = c, g
    else
      cpu_in[i], gpu_in[i] = x, x
    end
  end
  local yc, yg = fn(unpack(cpu_in, 1, #inputs)), fn(unpack(gpu_in, 1, #inputs))
  CS.check(case .. ' (forward)', yg, yc:detach(), opts)
  local upstream = CS.base('float64', opts.seed or 17, yc.shape, { specials = false, lo = -1, hi = 1 })
  upstream = upstream:to(yc.dtype)
  yc:backward(upstream)
  yg:backward(upstream:cuda())
  for i, x in ipairs(inputs) do
    if T.is_tensor(x) and not fixed[i] then
      assert.is_not_nil(cpu_in[i].grad, case .. ': the cpu input ' .. i .. ' got no gradient')
      assert.is_not_nil(gpu_in[i].grad, case .. ': the cuda input ' .. i .. ' got no gradient')
      CS.check(case .. ' (grad ' .. i .. ')', gpu_in[i].grad, cpu_in[i].grad, opts)
    end
  end
end

return CS
