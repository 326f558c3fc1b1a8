-- cuda_reduce_spec.lua — CUDA reductions against the CPU: sum, mean, prod, amax, amin, all, any,
-- var/std, norms, max/min/argmax/argmin along dims, over non-contiguous inputs in every dtype they
-- take, with NaN, infinities and ties; empty dims; large tensors (the sliced two-pass paths);
-- run-to-run determinism; gradients through autograd. Pending without a GPU.
local T = require 'tessera'
local S = require 'support'
local CS = require 'cuda_support'

local DIMS = { { nil, 'all' }, { 0, 'dim 0' }, { 1, 'dim 1' }, { { 0, 1 }, 'dims {0,1}' }, { -1, 'dim -1' } }

describe('cuda reductions match the cpu', function()
  teardown(function() CS.report('reductions') end)

  CS.it('sum, prod, amax and amin over every dim, dtype and view', function()
    for _, name in ipairs { 'sum', 'prod', 'amax', 'amin' } do
      local dtypes = name == 'sum' and { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8', 'bool' }
        or CS.NUMERIC
      for di, dtype in ipairs(dtypes) do
        for vi, view in ipairs(CS.VIEWS) do
          -- prod of 96 values in [-4, 4] overflows: keep its values near 1
          local opts = name == 'prod' and { lo = 0.5, hi = 1.6 } or nil
          local c, g = CS.pair(dtype, 10 * di + vi, view[2], nil, opts)
          for _, d in ipairs(DIMS) do
            assert.equals(tostring(c[name](c, d[1]).shape), tostring(g[name](g, d[1]).shape))
            CS.check(name .. ' (' .. d[2] .. ', ' .. view[1] .. ')', g[name](g, d[1]), c[name](c, d[1]))
            if d[1] ~= nil then CS.check(name .. ' (keepdim)', g[name](g, d[1], true), c[name](c, d[1], true)) end
          end
        end
      end
    end
  end)

  CS.it('mean over every dim of every float dtype and view', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for vi, view in ipairs(CS.VIEWS) do
        local c, g = CS.pair(dtype, 100 + 10 * di + vi, view[2])
        for _, d in ipairs(DIMS) do CS.check('mean (' .. d[2] .. ')', g:mean(d[1]), c:mean(d[1])) end
      end
    end
  end)

  CS.it('all and any read every dtype, bool and uint8 as stored', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for vi, view in ipairs(CS.VIEWS) do
        local c, g = CS.pair(dtype, 200 + 10 * di + vi, view[2])
        -- mostly nonzero rows, some all-zero ones: both answers occur
        c, g = c:clone(), g:clone()
        c:select(0, 1):zero_()
        g:select(0, 1):zero_()
        for _, name in ipairs { 'all', 'any' } do
          for _, d in ipairs(DIMS) do CS.check(name .. ' (' .. d[2] .. ')', g[name](g, d[1]), c[name](c, d[1])) end
        end
      end
    end
  end)

  CS.it('var and std with corrections 0, 1 and 2 over every dim', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for vi, view in ipairs(CS.VIEWS) do
        for _, specials in ipairs { false, true } do
          local c, g = CS.pair(dtype, 300 + 10 * di + vi, view[2], nil, { specials = specials })
          for _, d in ipairs(DIMS) do
            for _, corr in ipairs { 0, 1, 2 } do
              CS.check('var (' .. d[2] .. ')', g:var { dim = d[1], correction = corr }, c:var { dim = d[1], correction = corr })
              CS.check('std (' .. d[2] .. ')', g:std { dim = d[1], correction = corr }, c:std { dim = d[1], correction = corr })
            end
          end
        end
      end
    end
    -- a single element with correction 1: 0/0
    local one = T.tensor({ 3.5 }, { device = 'cuda' })
    assert.is_true(one:var():item() ~= one:var():item())
  end)

  CS.it('norms of every order over every dim', function()
    for di, dtype in ipairs(CS.FLOATS) do
      for vi, view in ipairs(CS.VIEWS) do
        local c, g = CS.pair(dtype, 400 + 10 * di + vi, view[2])
        for _, p in ipairs { 0, 1, 2, 3, 0.5, -1, math.huge, -math.huge } do
          for _, d in ipairs(DIMS) do
            CS.check('norm (p=' .. p .. ')', g:norm(p, d[1]), c:norm(p, d[1]))
          end
        end
      end
    end
  end)

  CS.it('max/min along a dim and argmax/argmin: first index on ties, NaN wins', function()
    for di, dtype in ipairs(CS.NUMERIC) do
      for vi, view in ipairs(CS.VIEWS) do
        -- few distinct values (ties everywhere), with NaN and infinities for floats
        local base = CS.base(dtype, 500 + 10 * di + vi, nil, { lo = -2, hi = 2 })
        if dtype ~= 'int64' then base = base:round() end
        local c, g = view[2](base), view[2](base:cuda())
        for _, d in ipairs { 0, 1, -1 } do
          for _, name in ipairs { 'max', 'min' } do
            local cv, ci = c[name](c, d)
            local gv, gi = g[name](g, d)
            CS.check(name .. ' values', gv, cv, { exact = true })
            CS.check(name .. ' indices', gi, ci, { exact = true, column = dtype })
            local kv, ki = g[name](g, d, true)
            CS.check(name .. ' (keepdim)', kv, (c[name](c, d, true)), { exact = true })
            assert.equals(tostring(ki.shape), tostring(kv.shape))
          end
          CS.check('argmax', g:argmax(d), c:argmax(d), { exact = true, column = dtype })
          CS.check('argmin', g:argmin(d), c:argmin(d), { exact = true, column = dtype })
        end
        CS.check('argmax (flat)', g:argmax(), c:argmax(), { exact = true, column = dtype })
        CS.check('argmin (flat)', g:argmin(), c:argmin(), { exact = true, column = dtype })
        CS.check('max (all)', g:max(), c:max(), { exact = true })
      end
    end
    -- NaN beats every number and the first NaN wins; +inf ties with +inf by index
    local x = T.tensor({ 1, 0 / 0, math.huge, 0 / 0, math.huge }, { device = 'cuda' })
    assert.equals(1, x:argmax():item())
    assert.equals(1, x:argmin():item())
    local y = T.tensor({ 1, math.huge, 3, math.huge }, { device = 'cuda' })
    assert.equals(1, y:argmax():item())
  end)

  CS.it('0-d tensors and empty dims give the identities or the cpu errors', function()
    local c0 = T.tensor(2.5)
    local g0 = c0:cuda()
    for _, name in ipairs { 'sum', 'mean', 'prod', 'amax', 'amin', 'all', 'any' } do
      CS.check(name .. ' (0-d)', g0[name](g0), c0[name](c0), { exact = true })
      CS.check(name .. ' (0-d)', g0[name](g0, 0), c0[name](c0, 0), { exact = true })
    end
    local c = T.zeros(3, 0, 4)
    local g = c:cuda()
    for _, name in ipairs { 'sum', 'mean', 'prod', 'all', 'any' } do
      CS.check(name .. ' (empty)', g[name](g, 1), c[name](c, 1), { exact = true })
      CS.check(name .. ' (empty)', g[name](g), c[name](c), { exact = true })
      CS.check(name .. ' (empty)', g[name](g, 2), c[name](c, 2), { exact = true })
    end
    CS.check('var (empty)', g:var(1), c:var(1), { exact = true })
    CS.check('norm (empty)', g:norm(2, 1), c:norm(2, 1), { exact = true })
    S.assert_error(function() return g:amax(1) end, 'amax', 'size 0')
    S.assert_error(function() return g:argmax(1) end, 'argmax')
  end)

  CS.it('large tensors: full reductions, long rows and tall columns (sliced two-pass paths)', function()
    local cases = {
      { { 3000017 }, nil, 'full' },
      { { 1000003, 16 }, 0, 'tall columns' },
      { { 16, 100003 }, 1, 'long rows' },
      { { 3, 70001 }, 1, 'few long rows' },
      { { 500001, 7 }, 1, 'short rows' },
      { { 2048, 2048 }, 0, 'square columns' },
      { { 64, 300, 50 }, { 0, 2 }, 'outer dims' },
    }
    for i, case in ipairs(cases) do
      for _, dtype in ipairs { 'float32', 'float64', 'float16' } do
        local c = T.rand(case[1], { dtype = dtype, generator = T.Generator(i) }) - 0.5
        local g = c:cuda()
        CS.check('sum (' .. case[3] .. ')', g:sum(case[2]), c:sum(case[2]), { atol = 1e-3 })
        CS.check('amax (' .. case[3] .. ')', g:amax(case[2]), c:amax(case[2]), { exact = true })
        CS.check('var (' .. case[3] .. ')', g:var(case[2]), c:var(case[2]))
        CS.check('norm (' .. case[3] .. ')', g:norm(2, case[2]), c:norm(2, case[2]))
        if type(case[2]) ~= 'table' then
          CS.check('argmax (' .. case[3] .. ')', g:argmax(case[2]), c:argmax(case[2]), { exact = true, column = dtype })
        end
      end
      local ci = T.randint(-1000, 1000, case[1], { generator = T.Generator(i) })
      CS.check('sum (' .. case[3] .. ')', ci:cuda():sum(case[2]), ci:sum(case[2]), { exact = true })
    end
  end)

  CS.it('results are the same bits from run to run', function()
    local g = (T.rand({ 2000003 }, { generator = T.Generator(5) }) - 0.5):cuda()
    local m = (T.rand({ 300, 5000 }, { generator = T.Generator(6) }) - 0.5):cuda()
    local first = { g:sum():item(), g:var():item(), m:sum(0):sum():item(), m:norm(3, 1):sum():item() }
    for _ = 1, 3 do
      local again = { g:sum():item(), g:var():item(), m:sum(0):sum():item(), m:norm(3, 1):sum():item() }
      for k = 1, #first do assert.equals(first[k], again[k]) end
    end
  end)
end)

describe('cuda reduction gradients match the cpu', function()
  teardown(function() CS.report('reduction gradients') end)

  CS.it('sum, mean, prod, amax, var, std and norm backward', function()
    for _, dtype in ipairs { 'float32', 'float64' } do
      for vi, view in ipairs(CS.VIEWS) do
        local x = view[2](CS.base(dtype, 600 + vi, nil, { specials = false, lo = 0.5, hi = 1.5 }))
        for _, d in ipairs { { nil }, { 0 }, { 1 }, { { 0, 1 }, true } } do
          CS.check_grad('sum backward', function(t) return t:sum(d[1], d[2]) end, { x })
          CS.check_grad('mean backward', function(t) return t:mean(d[1], d[2]) end, { x })
          CS.check_grad('prod backward', function(t) return t:prod(d[1], d[2]) end, { x })
          CS.check_grad('amax backward', function(t) return t:amax(d[1], d[2]) end, { x })
          CS.check_grad('var backward', function(t) return t:var(d[1]) end, { x })
          CS.check_grad('std backward', function(t) return t:std(d[1]) end, { x })
          CS.check_grad('norm backward', function(t) return t:norm(2, d[1]) end, { x })
          CS.check_grad('norm 3 backward', function(t) return t:norm(3, d[1]) end, { x })
        end
        CS.check_grad('max(dim) backward', function(t) return (t:max(1)) end, { x })
        CS.check_grad('min(dim) backward', function(t) return (t:min(0)) end, { x })
      end
    end
  end)
end)
