-- cuda_spec.lua — the CUDA backend. On every machine: the build and device queries tell the
-- truth and asking for a GPU that is not there raises a clear error. With a GPU: CPU<->GPU parity
-- of copies, fills, aranges and every elementwise op on non-contiguous inputs in float32,
-- float64, float16, bfloat16 and int64, with a table of the largest relative errors seen.
-- Without a GPU, every parity test is reported pending, never passed.
local T = require 'tessera'
local S = require 'support'
local core = require 'tessera.core'
local CS = require 'cuda_support'

local has_gpu = CS.has_gpu

-- Whether this libtessera was configured with TESSERA_CUDA, from the build rather than from the
-- library: ctest says so in TESSERA_CUDA_BUILT, else the CMakeCache.txt beside the library does.
local function cuda_configured()
  local value = os.getenv('TESSERA_CUDA_BUILT')
  if not value then
    local lib = os.getenv('TESSERA_LIBRARY') or require('tessera.config').library
    local cache = io.open((lib:match('^(.*)/[^/]*$') or '.') .. '/CMakeCache.txt')
    if not cache then return nil end
    value = cache:read('*a'):match('TESSERA_CUDA:BOOL=(%w+)')
    cache:close()
    if not value then return nil end
  end
  local truthy = { ON = true, ['1'] = true, TRUE = true, YES = true, Y = true }
  return truthy[value:upper()] == true
end

local function library_path()
  return os.getenv('TESSERA_LIBRARY') or require('tessera.config').library
end

describe('cuda on every machine', function()
  it('is_compiled() says whether this build has the CUDA backend', function()
    local configured = cuda_configured()
    if configured == nil then pending('cannot tell how this libtessera was configured') return end
    assert.equals(configured, T.cuda.is_compiled())
  end)

  it('libtessera does not need the driver library (it must load on machines without a GPU)', function()
    local ldd = io.popen("ldd '" .. library_path() .. "' 2>&1")
    local out = ldd:read('*a')
    ldd:close()
    assert.is_nil(out:find('libcuda%.so'), 'libtessera links libcuda.so:\n' .. out)
    assert.is_nil(out:find('not found', 1, true), 'libtessera has unresolved libraries:\n' .. out)
  end)

  it('device_count() is a stable count, 0 without a CUDA build or without a GPU', function()
    local n = T.cuda.device_count()
    assert.is_true(n >= 0 and n == math.floor(n))
    assert.equals(n, T.cuda.device_count())
    assert.equals(n > 0, T.cuda.is_available())
    if not T.cuda.is_compiled() then assert.equals(0, n) end
    -- no NVIDIA device node: there is no GPU for the driver to find
    local node = io.open('/dev/nvidiactl')
    if node then node:close() else assert.equals(0, n) end
  end)

  it('asking for a GPU that is not there raises an error that says cuda', function()
    local device = has_gpu and 'cuda:' .. T.cuda.device_count() or 'cuda'
    local expected = has_gpu and 'requested'
      or T.cuda.is_compiled() and 'no CUDA device is available' or 'built without CUDA'
    S.assert_error(function() return T.zeros(2, 3, { device = device }) end, 'cuda', expected)
    S.assert_error(function() return T.empty({ 4 }, { device = device }) end, 'cuda', expected)
    S.assert_error(function() return T.arange(5, { device = device }) end, 'cuda', expected)
    S.assert_error(function() return T.tensor({ 1, 2 }, { device = device }) end, 'cuda', expected)
    S.assert_error(function() return T.full({ 2 }, 1.5, { device = device }) end, 'cuda', expected)
  end)

  it('moving a tensor to a missing GPU errors cleanly and leaves the tensor usable', function()
    local t = T.tensor({ { 1, 2 }, { 3, 4 } })
    local index = has_gpu and T.cuda.device_count() or nil
    S.assert_error(function() return t:cuda(index) end, 'cuda')
    S.assert_error(function() return t:to(index and 'cuda:' .. index or 'cuda') end, 'cuda')
    S.assert_error(function() return t:to { device = 'cuda:' .. (index or 0), dtype = 'float64' } end, 'cuda')
    assert.same({ { 1, 2 }, { 3, 4 } }, t:totable())
    assert.same({ { 2, 4 }, { 6, 8 } }, (t * 2):totable())
  end)

  it('synchronize on a missing device errors instead of crashing', function()
    local index = has_gpu and T.cuda.device_count() or 0
    S.assert_error(function() T.cuda.synchronize(index) end, 'cuda')
  end)

  it('rejects malformed device names', function()
    S.assert_error(function() return T.zeros(2, { device = 'cuda:x' }) end, 'unknown device')
    S.assert_error(function() return T.zeros(2, { device = 'gpu' }) end, 'unknown device')
  end)
end)

-- ---- parity with the CPU ------------------------------------------------------------------------
-- Ops made of IEEE-exact steps only (+ - * /, sqrt, rounding, comparisons): bit-identical results.
local EXACT = {
  neg = true, abs = true, sign = true, sqrt = true, rsqrt = true, relu = true, floor = true, ceil = true,
  round = true, trunc = true, reciprocal = true, square = true, logical_not = true, isnan = true,
  isinf = true, isfinite = true, add = true, sub = true, mul = true, div = true, maximum = true,
  minimum = true, remainder = true, floor_divide = true, eq = true, ne = true, lt = true, le = true,
  gt = true, ge = true, logical_and = true, logical_or = true, logical_xor = true, where = true,
  clamp = true, copy = true, fill = true, arange = true,
}

-- CS.check, exact where `op` (default: the case) is EXACT; the error table files the result under
-- `column` (default: its dtype).
local function assert_parity(case, got, want, op, column)
  CS.check(case, got, want, { exact = EXACT[op or case], column = column })
end

-- CS.base's [8, 12] tensor of dtype (integers never 0 when nonzero).
local function cpu_base(dtype, seed, nonzero)
  return CS.base(dtype, seed, nil, { nonzero = nonzero })
end

-- CPU and GPU copies of the same values, seen through `view` (one of CS.VIEWS).
local function pair(dtype, seed, view, nonzero)
  local c, g = CS.pair(dtype, seed, view, nil, { nonzero = nonzero })
  assert.is_true(g.is_cuda)
  return c, g
end

local UNARY = { 'neg', 'abs', 'sign', 'exp', 'expm1', 'log', 'log1p', 'sqrt', 'rsqrt', 'tanh', 'sigmoid',
  'erf', 'relu', 'gelu', 'silu', 'sin', 'cos', 'floor', 'ceil', 'round', 'trunc', 'reciprocal', 'square',
  'logical_not', 'isnan', 'isinf', 'isfinite' }
local BINARY = { 'add', 'sub', 'mul', 'div', 'pow', 'maximum', 'minimum', 'remainder', 'floor_divide', 'atan2',
  'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'logical_and', 'logical_or', 'logical_xor' }

describe('cuda parity with the cpu', function()
  teardown(function() CS.report('elementwise') end)

  CS.it('host <-> device round trips keep every value of every dtype', function()
    for _, dtype in ipairs(CS.ALL_DTYPES) do
      local c = cpu_base(dtype, 3)
      local g = c:cuda()
      assert.equals('cuda:0', g.device)
      assert.equals(dtype, g.dtype)
      S.assert_close(g:cpu(), c, 0, 0, 'round trip ' .. dtype)
      S.assert_close(T.tensor(c:totable(), { dtype = dtype, device = 'cuda' }), c, 0, 0, 'T.tensor ' .. dtype)
      S.assert_close(g:totable(), c, 0, 0, 'totable ' .. dtype)
      local s = c[{ 3, 5 }]
      assert.equals(s:item(), g[{ 3, 5 }]:item())
    end
  end)

  CS.it('copy converts every dtype to every dtype like the cpu (strided source and destination)', function()
    for si, src_dtype in ipairs(CS.ALL_DTYPES) do
      -- out-of-range and fractional values exercise saturation, wrapping and bool = v != 0
      local base = cpu_base('float64', 40 + si) * 70
      base[{ 0, 0 }] = 1e20
      base[{ 0, 1 }] = -1e20
      base[{ 0, 2 }] = 0 / 0
      base[{ 0, 3 }] = 0.25
      local c_src = base:to(src_dtype):t()
      local g_src = base:to(src_dtype):cuda():t()
      for _, dst_dtype in ipairs(CS.ALL_DTYPES) do
        local want = c_src:to(dst_dtype)
        assert_parity('copy', g_src:to(dst_dtype), want)
        -- into a transposed (non-contiguous) destination on the device
        local g_dst = T.zeros(8, 12, { dtype = dst_dtype, device = 'cuda' }):t()
        g_dst:copy_(g_src)
        assert_parity('copy', g_dst, want)
      end
    end
  end)

  CS.it('copy_ across devices broadcasts and converts into non-contiguous views', function()
    local src = cpu_base('float64', 9):slice(1, 0, nil, 2)         -- [8, 6], strided, on the cpu
    local g = T.zeros(6, 8, { dtype = 'float16', device = 'cuda' })
    g:t():copy_(src)                                               -- cpu -> strided gpu view
    assert_parity('copy', g, src:to('float16'):t():contiguous())
    local back = T.zeros(6, 8, { dtype = 'float32' })
    back:copy_(g)                                                  -- gpu -> cpu, with conversion
    S.assert_close(back, src:to('float16'):t():to('float32'), 0, 0, 'copy back')
    local row = T.tensor({ 1, 2, 3 }, { device = 'cuda' })
    local grid = T.zeros(4, 3, { device = 'cuda', dtype = 'int64' })
    grid:copy_(row)                                                -- broadcast on the device
    assert.same({ { 1, 2, 3 }, { 1, 2, 3 }, { 1, 2, 3 }, { 1, 2, 3 } }, grid:totable())
    S.assert_error(function() grid:copy_(T.ones(5, { device = 'cuda' })) end, 'copy_', 'broadcast')
  end)

  CS.it('fill and full match the cpu for every dtype and awkward values', function()
    for _, dtype in ipairs(CS.ALL_DTYPES) do
      for _, v in ipairs { 1.5, -2.7, 0 / 0, 1e10, -1e30, 0, -0.0, 255.6, 65520, math.huge } do
        assert_parity('fill', T.full({ 3, 5 }, v, { dtype = dtype, device = 'cuda' }), T.full({ 3, 5 }, v, { dtype = dtype }))
        local g, c = T.ones(4, 10, { dtype = dtype, device = 'cuda' }), T.ones(4, 10, { dtype = dtype })
        g:slice(1, 1, nil, 3):fill_(v)
        c:slice(1, 1, nil, 3):fill_(v)
        assert_parity('fill', g, c)
      end
      assert_parity('fill', T.zeros(7, { dtype = dtype, device = 'cuda' }), T.zeros(7, { dtype = dtype }))
      local g = T.ones(3, 4, { dtype = dtype, device = 'cuda' })
      g:t():zero_()
      assert_parity('fill', g, T.zeros(3, 4, { dtype = dtype }))
    end
  end)

  CS.it('arange, linspace and eye match the cpu', function()
    for _, dtype in ipairs(CS.ALL_DTYPES) do
      for _, r in ipairs { { 0, 10, 1 }, { -3, 7.5, 0.3 }, { 5, -5, -0.7 }, { 0, 300, 1.1 } } do
        local opts = { dtype = dtype }
        local want = T.arange(r[1], r[2], r[3], opts)
        opts.device = 'cuda'
        assert_parity('arange', T.arange(r[1], r[2], r[3], opts), want)
      end
      if core.is_floating(core.dtype(dtype)) then
        assert_parity('arange', T.linspace(-1, 1, 11, { dtype = dtype, device = 'cuda' }), T.linspace(-1, 1, 11, { dtype = dtype }))
      end
      assert_parity('arange', T.eye(4, 6, { dtype = dtype, device = 'cuda' }), T.eye(4, 6, { dtype = dtype }))
    end
    assert.equals(0, T.arange(3, 3, { device = 'cuda' }):numel())
  end)

  CS.it('every unary op matches the cpu on non-contiguous inputs', function()
    for _, name in ipairs(UNARY) do
      for di, dtype in ipairs(CS.NUMERIC) do
        for vi, view in ipairs(CS.VIEWS) do
          local c, g = pair(dtype, di * 100 + vi, view[2])
          assert_parity(name, g[name](g), c[name](c), name, dtype)
        end
      end
    end
  end)

  CS.it('in-place unary ops write through non-contiguous views', function()
    for _, name in ipairs { 'exp', 'neg', 'floor', 'sigmoid', 'relu' } do
      for _, dtype in ipairs(CS.FLOATS) do
        local c, g = cpu_base(dtype, 5), cpu_base(dtype, 5):cuda()
        local cv, gv = c:t(), g:t()
        cv[name .. '_'](cv)
        gv[name .. '_'](gv)
        assert_parity(name .. '_', g, c, name, dtype)
      end
    end
  end)

  CS.it('every binary op matches the cpu with non-contiguous, broadcast and scalar operands', function()
    for _, name in ipairs(BINARY) do
      local dividing = name == 'remainder' or name == 'floor_divide'
      for di, dtype in ipairs(CS.NUMERIC) do
        local ca, ga = pair(dtype, di * 10 + 1, CS.VIEWS[2][2], dividing)
        local cb, gb = pair(dtype, di * 10 + 2, CS.VIEWS[2][2], dividing)   -- [12, 8] like a
        local crow, grow = cb:select(0, 4), gb:select(0, 4)                -- [8], broadcast over rows
        local ccol, gcol = cb:select(1, 3):unsqueeze(1), gb:select(1, 3):unsqueeze(1) -- [12, 1]
        local f = T[name]
        assert_parity(name, f(ga, gb), f(ca, cb), name, dtype)
        assert_parity(name .. ' (row)', f(ga, grow), f(ca, crow), name, dtype)
        assert_parity(name .. ' (col)', f(gcol, ga), f(ccol, ca), name, dtype)
        -- scalars representable in every dtype: see the float16 scalar test below
        local s = dtype == 'int64' and 3 or 1.75
        assert_parity(name .. ' (scalar)', f(ga, s), f(ca, s), name, dtype)
        assert_parity(name .. ' (scalar)', f(s, gb), f(s, cb), name, dtype)
      end
    end
  end)

  CS.it('binary ops promote mixed dtypes like the cpu', function()
    local pairs_ = { { 'float16', 'float32' }, { 'bfloat16', 'float16' }, { 'int64', 'float32' },
                     { 'int32', 'int64' }, { 'uint8', 'bool' }, { 'float64', 'bfloat16' } }
    for i, p in ipairs(pairs_) do
      local ca, ga = pair(p[1], i, CS.VIEWS[3][2])
      local cb, gb = pair(p[2], i + 50, CS.VIEWS[3][2])
      for _, name in ipairs { 'add', 'mul', 'div', 'maximum', 'lt', 'logical_xor' } do
        assert_parity('mixed ' .. name, T[name](ga, gb), T[name](ca, cb), name)
      end
    end
  end)

  CS.it('in-place binary ops write through non-contiguous views', function()
    for _, dtype in ipairs(CS.NUMERIC) do
      local c, g = cpu_base(dtype, 8), cpu_base(dtype, 8):cuda()
      local cb, gb = cpu_base(dtype, 9):select(0, 1), cpu_base(dtype, 9):cuda():select(0, 1)
      c:slice(1, 0, nil, 2):add_(cb:slice(0, 0, nil, 2))
      g:slice(1, 0, nil, 2):add_(gb:slice(0, 0, nil, 2))
      assert_parity('add_', g, c, 'add')
      c:mul_(3)
      g:mul_(3)
      assert_parity('mul_', g, c, 'mul')
    end
  end)

  CS.it('float16 with a scalar that float16 cannot hold stays within rounding of the cpu', function()
    -- The runtime stores a weak scalar in the backend's compute dtype, float16 on CUDA, so 0.1
    -- becomes float16(0.1) there and float32(0.1) on the cpu: at most a rounding step apart.
    for _, dtype in ipairs { 'float16', 'bfloat16' } do
      local c, g = pair(dtype, 77, CS.VIEWS[2][2])
      assert_parity('mul 0.1', g * 0.1, c * 0.1)   -- not EXACT: within a rounding step
      assert_parity('add 0.1', g + 0.1, c + 0.1)
    end
  end)

  CS.it('integer floor division and remainder by zero raise an error', function()
    local a = T.tensor({ 5, -7, 9 }, { dtype = 'int64', device = 'cuda' })
    local b = T.tensor({ 2, 0, 3 }, { dtype = 'int64', device = 'cuda' })
    S.assert_error(function() return T.floor_divide(a, b) end, 'floor_divide', 'division by zero')
    S.assert_error(function() return T.remainder(a, b) end, 'remainder', 'division by zero')
    S.assert_error(function() return a % 0 end, 'remainder', 'division by zero')
    assert.same({ 2, -4, 3 }, T.floor_divide(a, T.tensor({ 2, 2, 3 }, { dtype = 'int64', device = 'cuda' })):totable())
    assert.same({ 2, 2, 0 }, (a % 3):totable())
  end)

  CS.it('where matches the cpu for every dtype, broadcast and scalar operands', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      local cc, gc = pair('float64', 500 + di, CS.VIEWS[2][2])
      local ccond, gcond = cc:gt(0), gc:gt(0)
      local ca, ga = pair(dtype, 600 + di, CS.VIEWS[2][2])
      local cb, gb = pair(dtype, 700 + di, CS.VIEWS[2][2])
      assert_parity('where', T.where(gcond, ga, gb), T.where(ccond, ca, cb))
      assert_parity('where', T.where(gcond:select(0, 0), ga, gb:select(1, 2):unsqueeze(1)),
                    T.where(ccond:select(0, 0), ca, cb:select(1, 2):unsqueeze(1)))
      if dtype ~= 'bool' then assert_parity('where', T.where(gcond, ga, 2), T.where(ccond, ca, 2)) end
    end
  end)

  CS.it('clamp matches the cpu, NaN passing through and integer bounds rounding inward', function()
    for di, dtype in ipairs(CS.NUMERIC) do
      local c, g = pair(dtype, 900 + di, CS.VIEWS[3][2])
      for _, b in ipairs { { -1, 1 }, { 0.5, nil }, { nil, 2.5 }, { 2, -2 }, { -100, 100 } } do
        assert_parity('clamp', g:clamp(b[1], b[2]), c:clamp(b[1], b[2]))
      end
      local c2, g2 = cpu_base(dtype, 3), cpu_base(dtype, 3):cuda()
      c2:t():clamp_(-1.5, 1.5)
      g2:t():clamp_(-1.5, 1.5)
      assert_parity('clamp_', g2, c2, 'clamp')
    end
  end)

  CS.it('ops refuse tensors on different devices', function()
    local g, c = T.ones(3, { device = 'cuda' }), T.ones(3)
    S.assert_error(function() return g + c end, 'add', 'different devices', 'cuda:0', 'cpu')
    S.assert_error(function() return T.where(c:gt(0), g, g) end, 'where', 'different devices')
  end)

  CS.it('results are ready without an explicit synchronize, and synchronize works', function()
    local x = T.arange(0, 100000, { dtype = 'float32', device = 'cuda' })
    for _ = 1, 20 do x = x + 1 end
    assert.equals(100019, x[99999]:item())
    T.cuda.synchronize()
    T.cuda.synchronize(0)
    assert.is_true(T.cuda.memory_stats().live > 0)
  end)

  CS.it('large tensors: the grid-stride loop and 64-bit indexing past 2^32 elements', function()
    -- 2^32 + 16 bytes: more elements than one grid covers and than 32-bit index math holds.
    local n = 2 ^ 32 + 16
    local x = T.arange(n, { dtype = 'uint8', device = 'cuda' })          -- x[i] = i mod 256
    assert.equals((n - 1) % 256, x[n - 1]:item())
    local y = x:view(n / 2, 2):t():contiguous()                          -- strided, numel > 2^32
    assert.equals(2, y:size(0))
    assert.equals(n / 2, y:size(1))
    for _, c in ipairs { 0, 12345, n / 2 - 1 } do
      assert.equals((2 * c) % 256, y[{ 0, c }]:item())
      assert.equals((2 * c + 1) % 256, y[{ 1, c }]:item())
    end
    x:free()
    y:free()
  end)
end)
