-- cuda_linalg_spec.lua — matmul and bmm on CUDA (cuBLASLt; cuBLAS for float64) against the CPU:
-- transposed views read in place, broadcast batches (stride 0), operands strided in both dims,
-- misaligned views, vectors, empty sums, sizes past one tile, gradients, run-to-run determinism,
-- and the TF32 switch (off by default: float32 stays within float32 rounding). GPU tests are
-- pending without a device; the switch itself is checked everywhere.
local T = require 'tessera'
local S = require 'support'
local CS = require 'cuda_support'

-- GEMM errors grow with the length k of the sums.
local function tol(dtype, k)
  if dtype == 'float64' then return { rtol = 1e-12, atol = 1e-13 * (k + 1) } end
  return { rtol = 1e-5, atol = 2e-6 * (k + 1) }
end

-- Values in [-1, 1]; zeros for an empty shape.
local function rand(dtype, seed, shape)
  for _, s in ipairs(shape) do
    if s == 0 then return T.zeros(shape, { dtype = dtype }) end
  end
  return CS.base(dtype, seed, shape, { specials = false, lo = -1, hi = 1 })
end

-- { name, a shape, b shape, view of a, view of b } — views applied alike on both devices.
local same = function(t) return t end
local CASES = {
  { 'matrix @ matrix', { 5, 7 }, { 7, 3 } },
  { 'batched', { 4, 5, 7 }, { 4, 7, 3 } },
  { 'batch broadcast against a matrix (rows folded)', { 2, 3, 5, 7 }, { 7, 3 } },
  { 'matrix against a batch', { 5, 7 }, { 3, 7, 4 } },
  { 'broadcast batch dims', { 2, 1, 5, 7 }, { 1, 3, 7, 4 } },
  { 'vector @ matrix', { 7 }, { 7, 3 } },
  { 'matrix @ vector', { 5, 7 }, { 7 } },
  { 'vector @ vector', { 7 }, { 7 } },
  { 'single row and column', { 4, 1, 7 }, { 4, 7, 1 } },
  { 'transposed operands', { 4, 7, 5 }, { 4, 3, 7 },
    function(t) return t:transpose(-1, -2) end, function(t) return t:transpose(-1, -2) end },
  { 'expanded batch (stride 0)', { 1, 5, 7 }, { 4, 7, 3 }, function(t) return t:expand(4, 5, 7) end },
  { 'strided in both dims (copied)', { 3, 10, 14 }, { 3, 7, 3 }, function(t) return t:slice(1, 0, nil, 2):slice(2, 0, nil, 2) end },
  { 'misaligned views', { 4, 5, 8 }, { 4, 8, 4 },
    function(t) return t:slice(2, 1) end, function(t) return t:slice(1, 1) end },
  { 'larger than a tile', { 3, 130, 96 }, { 3, 96, 70 } },
  { 'empty sum (k = 0)', { 3, 5, 0 }, { 3, 0, 4 } },
  { 'empty batch', { 0, 5, 7 }, { 0, 7, 4 } },
}

describe('cuda matmul settings on every machine', function()
  it('TF32 is off by default and the switch reports the previous setting', function()
    assert.is_false(T.cuda.allow_tf32())
    assert.is_false(T.cuda.allow_tf32(true))
    assert.is_true(T.cuda.allow_tf32())
    assert.is_true(T.cuda.allow_tf32(false))
    assert.is_false(T.cuda.allow_tf32())
    S.assert_error(function() T.cuda.allow_tf32('yes') end, 'allow_tf32', 'boolean')
  end)
end)

describe('cuda matmul matches the cpu', function()
  teardown(function() CS.report('matmul') end)

  CS.it('every layout of matmul and bmm in float32 and float64', function()
    for ci, case in ipairs(CASES) do
      local name, ashape, bshape = case[1], case[2], case[3]
      local va, vb = case[4] or same, case[5] or same
      for di, dtype in ipairs { 'float32', 'float64' } do
        local ca, cb = va(rand(dtype, 10 * ci + di, ashape)), vb(rand(dtype, 10 * ci + di + 5, bshape))
        local ga, gb = va(rand(dtype, 10 * ci + di, ashape):cuda()), vb(rand(dtype, 10 * ci + di + 5, bshape):cuda())
        local k = ca:size(-1)
        CS.check('matmul (' .. name .. ')', T.matmul(ga, gb), T.matmul(ca, cb), tol(dtype, k))
        if ca:dim() == 3 and cb:dim() == 3 then
          CS.check('bmm (' .. name .. ')', T.bmm(ga, gb), T.bmm(ca, cb), tol(dtype, k))
        end
      end
    end
  end)

  CS.it('gradients through matmul, broadcast batches summed', function()
    for di, dtype in ipairs { 'float32', 'float64' } do
      local a, b = rand(dtype, 300 + di, { 2, 3, 5, 7 }), rand(dtype, 310 + di, { 3, 7, 4 })
      CS.check_grad('matmul backward', function(x, y) return T.matmul(x, y) end, { a, b }, tol(dtype, 20))
      local c, d = rand(dtype, 320 + di, { 6, 9 }), rand(dtype, 330 + di, { 4, 9 })
      CS.check_grad('matmul backward (transposed)', function(x, y) return T.matmul(x, y:t()) end, { c, d }, tol(dtype, 9))
    end
  end)

  CS.it('products are bit-identical run to run', function()
    local a, b = rand('float32', 41, { 8, 64, 96 }):cuda(), rand('float32', 42, { 8, 96, 48 }):cuda()
    local first = T.bmm(a, b)
    for _ = 1, 3 do CS.check('bmm (repeat)', T.bmm(a, b), first, { exact = true }) end
  end)

  CS.it('TF32, when allowed, stays within TF32 rounding, and the default is full float32', function()
    local ca, cb = rand('float32', 51, { 4, 64, 256 }), rand('float32', 52, { 4, 256, 64 })
    local ga, gb = ca:cuda(), cb:cuda()
    local want = T.bmm(ca:to('float64'), cb:to('float64')):to('float32')
    CS.check('bmm (full float32)', T.bmm(ga, gb), want, tol('float32', 256))
    local previous = T.cuda.allow_tf32(true)
    local ok, err = pcall(function()
      CS.check('bmm (tf32)', T.bmm(ga, gb), want, { rtol = 1e-2, atol = 2e-2 })
    end)
    T.cuda.allow_tf32(previous)
    assert(ok, err)
    CS.check('bmm (float32 again)', T.bmm(ga, gb), want, tol('float32', 256))
  end)
end)
