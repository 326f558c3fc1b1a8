-- linalg_spec.lua — matmul, mm, bmm, mv and dot against a plain-Lua float64 triple loop.
local T = require 'tessera'
local S = require 'support'

-- numpy.matmul on flat row-major lists: returns the flat result and its shape.
local function ref_matmul(av, ashape, bv, bshape)
  local a1, b1 = #ashape == 1, #bshape == 1
  local as = a1 and { 1, ashape[1] } or ashape
  local bs = b1 and { bshape[1], 1 } or bshape
  local n, k, m = as[#as - 1], as[#as], bs[#bs]
  assert(bs[#bs - 1] == k, 'reference: inner dims differ')
  local na, nb = #as - 2, #bs - 2
  local nbatch = math.max(na, nb)
  local batch = {}
  for i = 1, nbatch do
    local da, db = i - (nbatch - na), i - (nbatch - nb)
    local sa = da >= 1 and as[da] or 1
    local sb = db >= 1 and bs[db] or 1
    batch[i] = math.max(sa, sb)
  end
  -- flat offset of batch index idx (1-based list) in an operand with batch dims `dims`
  local function batch_offset(idx, shape, nd, per)
    local off, stride = 0, per
    for d = nd, 1, -1 do
      local i = idx[d + (nbatch - nd)]
      if shape[d] == 1 then i = 0 end
      off = off + i * stride
      stride = stride * shape[d]
    end
    return off
  end
  local out, total = {}, 1
  for i = 1, nbatch do total = total * batch[i] end
  local idx = {}
  for i = 1, nbatch do idx[i] = 0 end
  for _ = 1, total do
    local oa, ob = batch_offset(idx, as, na, n * k), batch_offset(idx, bs, nb, k * m)
    for r = 0, n - 1 do
      for c = 0, m - 1 do
        local s = 0
        for j = 0, k - 1 do s = s + av[oa + r * k + j + 1] * bv[ob + j * m + c + 1] end
        out[#out + 1] = s
      end
    end
    for d = nbatch, 1, -1 do
      idx[d] = idx[d] + 1
      if idx[d] < batch[d] then break end
      idx[d] = 0
    end
  end
  local shape = {}
  for i = 1, nbatch do shape[i] = batch[i] end
  if not a1 then shape[#shape + 1] = n end
  if not b1 then shape[#shape + 1] = m end
  return out, shape
end

local function shape_of(t)
  local s = t.shape
  local out = {}
  for i = 1, #s do out[i] = s[i] end
  return out
end

-- Values of a tensor as read back (so float32 inputs are compared with what they really hold).
local function flat(t) return S.flatten({ t:totable() }) end

local function check(a, b, rtol, what)
  local expected, eshape = ref_matmul(flat(a), shape_of(a), flat(b), shape_of(b))
  local got = T.matmul(a, b)
  assert.same(eshape, shape_of(got))
  assert.is_true(got:is_contiguous())
  S.assert_close(got, expected, rtol or 1e-12, rtol and 1e-5 or 1e-12, what)
  return got
end

local seed = 0
local function rand(shape, dtype)
  seed = seed + 1
  return (S.rand_tensor(shape, seed, dtype))
end

describe('matmul', function()
  it('handles every rank combination from 1 to 4 dims', function()
    local n, k, m = 4, 5, 3
    local a_batch = { [3] = { 3 }, [4] = { 2, 1 } }
    local b_batch = { [3] = { 1 }, [4] = { 1, 3 } }
    for ra = 1, 4 do
      for rb = 1, 4 do
        local as, bs = {}, {}
        for _, s in ipairs(a_batch[ra] or {}) do as[#as + 1] = s end
        for _, s in ipairs(b_batch[rb] or {}) do bs[#bs + 1] = s end
        if ra == 1 then as = { k } else as[#as + 1] = n; as[#as + 1] = k end
        if rb == 1 then bs = { k } else bs[#bs + 1] = k; bs[#bs + 1] = m end
        check(rand(as), rand(bs), nil, string.format('rank %d @ rank %d', ra, rb))
      end
    end
  end)

  it('1-D @ 1-D is a 0-d dot product', function()
    local r = check(rand { 7 }, rand { 7 })
    assert.equal(0, r:dim())
  end)

  it('broadcasts batch dims without copying either side', function()
    check(rand { 5, 1, 4, 3 }, rand { 6, 3, 2 })
    check(rand { 2, 3, 4 }, rand { 4, 5 })          -- folds the batch into the rows
    check(rand { 4, 5 }, rand { 2, 5, 3 })          -- left operand shared by every batch
    check(rand { 1, 3, 4 }, rand { 7, 4, 2 })
    check(rand { 2, 1, 3, 1, 4 }, rand { 3, 1, 4, 2 })
    check(rand { 3, 4 }:expand(6, 3, 4), rand { 6, 4, 2 })  -- stride-0 batch from expand
    check(rand { 2, 3, 1, 4 }, rand { 4 })          -- batched matrix @ vector
    check(rand { 4 }, rand { 2, 3, 4, 5 })          -- vector @ batched matrix
  end)

  it('accepts transposed, sliced and permuted operands', function()
    check(rand { 5, 4 }:t(), rand { 5, 3 })                        -- columns contiguous
    check(rand { 4, 5 }, rand { 3, 5 }:t())
    check(rand { 6, 10 }:slice(1, 0, nil, 2):slice(0, 0, nil, 2), rand { 5, 3 })  -- no unit stride
    check(rand { 4, 5 }, rand { 10, 6 }:slice(0, 0, nil, 2):slice(1, 0, nil, 2))
    check(rand { 3, 2, 4, 5 }:permute(1, 0, 2, 3), rand { 5, 6 })  -- batch dims that cannot merge
    check(rand { 3, 2, 4, 5 }:permute(1, 0, 3, 2), rand { 2, 3, 4, 6 })
    check(rand { 4, 10 }:slice(1, 0, nil, 2), rand { 10 }:slice(0, 0, nil, 2))      -- strided vector
    check(rand { 10 }:slice(0, 1, nil, 2), rand { 5, 4 })
    check(rand { 2, 6, 6 }:narrow(1, 1, 4):narrow(2, 1, 5), rand { 2, 5, 3 }:transpose(1, 2):contiguous():transpose(1, 2))
  end)

  it('computes float32 within float32 accuracy', function()
    check(rand({ 3, 17, 33 }, 'float32'), rand({ 33, 9 }, 'float32'), 1e-5)
    check(rand({ 40 }, 'float32'), rand({ 40 }, 'float32'), 1e-5)
    check(rand({ 8, 7 }, 'float32'):t(), rand({ 8, 2 }, 'float32'), 1e-5)
  end)

  it('uses every path: many small products, one large product', function()
    check(rand { 200, 3, 4 }, rand { 200, 4, 2 })        -- batch spread over threads
    local a, b = rand { 130, 70 }, rand { 70, 90 }        -- large enough for OpenBLAS threads
    check(a, b)
    check(a:t():contiguous():t(), b)
  end)

  it('handles empty dims', function()
    assert.same({ 0, 4 }, shape_of(T.matmul(T.zeros(0, 3, { dtype = 'float64' }), T.zeros(3, 4, { dtype = 'float64' }))))
    local z = T.matmul(T.ones(2, 0, { dtype = 'float64' }), T.ones(0, 3, { dtype = 'float64' }))
    assert.same({ { 0, 0, 0 }, { 0, 0, 0 } }, z:totable())
    assert.same({ 0, 2, 2 }, shape_of(T.matmul(T.zeros(0, 2, 3), T.zeros(3, 2))))
    assert.equal(0, T.dot(T.zeros(0), T.zeros(0)):item())
  end)

  it('returns a new tensor', function()
    local a = T.eye(3, { dtype = 'float64' })
    local r = a:matmul(a)
    assert.is_false(r:shares_storage(a))
  end)
end)

describe('mm, bmm, mv, dot', function()
  it('compute the same as matmul', function()
    local a, b = rand { 3, 4 }, rand { 4, 2 }
    S.assert_close(a:mm(b), (ref_matmul(flat(a), { 3, 4 }, flat(b), { 4, 2 })), 1e-12, 1e-12)
    local x, y = rand { 2, 3, 4 }, rand { 2, 4, 5 }
    S.assert_close(T.bmm(x, y), (ref_matmul(flat(x), { 2, 3, 4 }, flat(y), { 2, 4, 5 })), 1e-12, 1e-12)
    S.assert_close(x:transpose(1, 2):contiguous():transpose(1, 2):bmm(y), T.bmm(x, y), 1e-12, 1e-12)
    local v = rand { 4 }
    S.assert_close(a:mv(v), (ref_matmul(flat(a), { 3, 4 }, flat(v), { 4 })), 1e-12, 1e-12)
    local w = rand { 4 }
    S.assert_close(v:dot(w), (ref_matmul(flat(v), { 4 }, flat(w), { 4 })), 1e-12, 1e-12)
    S.assert_close(T.dot(v, w), v:dot(w), 0, 0)
  end)

  it('insist on their ranks', function()
    S.assert_error(function() rand { 2, 3, 4 }:mm(rand { 4, 2 }) end, 'mm: expected 2-D tensors, got shapes [2,3,4] and [4,2]')
    S.assert_error(function() rand { 3, 4 }:bmm(rand { 3, 4, 2 }) end, 'bmm: expected 3-D tensors', '[3,4] and [3,4,2]')
    S.assert_error(function() rand { 3, 4 }:mv(rand { 4, 1 }) end, 'mv: expected a 2-D matrix and a 1-D vector')
    S.assert_error(function() rand { 3 }:dot(rand { 3, 1 }) end, 'dot: expected 1-D tensors, got shapes [3] and [3,1]')
  end)

  it('bmm does not broadcast', function()
    S.assert_error(function() T.bmm(rand { 2, 3, 4 }, rand { 1, 4, 5 }) end,
      'bmm: shapes [2,3,4] and [1,4,5] are not compatible')
  end)
end)

describe('bad input', function()
  it('names both shapes when they do not fit', function()
    S.assert_error(function() T.matmul(rand { 2, 3 }, rand { 4, 5 }) end, 'matmul: shapes [2,3] and [4,5] are not compatible')
    S.assert_error(function() T.matmul(rand { 3 }, rand { 4 }) end, 'matmul: shapes [3] and [4] are not compatible')
    S.assert_error(function() T.matmul(rand { 2, 3, 4 }, rand { 5, 4, 6 }) end,
      'matmul: shapes [2,3,4] and [5,4,6] are not compatible: batch dims [2] and [5] do not broadcast')
    S.assert_error(function() T.matmul(T.tensor(2, { dtype = 'float64' }), rand { 2 }) end,
      'matmul: shapes [] and [2] are not compatible: both operands need at least 1 dim')
  end)

  it('names both dtypes when they are not one floating dtype', function()
    S.assert_error(function() T.matmul(T.zeros(2, 2, { dtype = 'int64' }), T.zeros(2, 2)) end,
      'matmul: expected floating operands (float32, float64, float16 or bfloat16) of the same dtype, got int64 and float32')
    S.assert_error(function() T.matmul(T.zeros(2, 2), T.zeros(2, 2, { dtype = 'float64' })) end,
      'got float32 and float64')
    S.assert_error(function() T.bmm(T.zeros(1, 2, 2, { dtype = 'float16' }), T.zeros(1, 2, 2, { dtype = 'bfloat16' })) end,
      'bmm: expected floating operands (float32, float64, float16 or bfloat16) of the same dtype, got float16 and bfloat16')
  end)

  it('multiplies float16 and bfloat16 in float32 on the cpu, rounding the result once', function()
    for _, dtype in ipairs { 'float16', 'bfloat16' } do
      local a, b = rand({ 2, 5, 7 }):to(dtype), rand({ 7, 3 }):to(dtype)
      local want = T.matmul(a:float(), b:float()):to(dtype)
      local got = T.matmul(a, b)
      assert.equals(dtype, got.dtype)
      assert.is_true(got:eq(want):all():item(), dtype .. ': matmul')
      local c = rand({ 2, 7, 4 }):to(dtype)
      assert.is_true(T.bmm(a, c):eq(T.bmm(a:float(), c:float()):to(dtype)):all():item(), dtype .. ': bmm')
      -- gradients come back in the operands' dtype
      local x, y = a:clone():requires_grad_(), b:clone():requires_grad_()
      T.matmul(x, y):sum():backward()
      assert.equals(dtype, x.grad.dtype)
      assert.is_true(x.grad:eq(T.ones(2, 5, 3, { dtype = dtype }):matmul(b:t())):all():item(), dtype .. ': grad')
    end
  end)

  it('rejects non-tensors and freed tensors', function()
    S.assert_error(function() T.matmul(rand { 2, 2 }, 3) end, 'matmul: expected a tensor, got number')
    local t = rand { 2, 2 }
    t:free()
    S.assert_error(function() T.matmul(rand { 2, 2 }, t) end, 'matmul: tensor used after free()')
    S.assert_error(function() t:mm(rand { 2, 2 }) end, 'mm: tensor used after free()')
  end)
end)
