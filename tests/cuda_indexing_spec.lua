-- cuda_indexing_spec.lua — CUDA indexing, sorting and UM-MAE compaction against the CPU:
-- index_select, gather, scatter (replace: the last write in row-major order wins; add: the CPU's
-- sums bit for bit), masked_fill, masked_select, nonzero, advanced indexing and index_put (with
-- duplicate indices, broadcast values, bool masks, accumulate), sort/argsort/topk (NaN largest,
-- stable ties, -0.0 == 0.0), the mask generators (the same bytes from the same generator state),
-- uniform_compact with masks made on either device, and their gradients. Pending without a GPU.
local T = require 'tessera'
local S = require 'support'
local CS = require 'cuda_support'

-- int64 indices on both devices.
local function index_pair(values)
  local c = T.tensor(values, { dtype = 'int64' })
  return c, c:cuda()
end

-- Random int64 indices in [lo, hi) of `shape`, repeats included.
local function random_indices(shape, lo, hi, seed)
  local c = T.randint(lo, hi, shape, { generator = T.Generator(seed) })
  return c, c:cuda()
end

describe('cuda indexing matches the cpu', function()
  teardown(function() CS.report('indexing') end)

  CS.it('index_select along each dim, every dtype, repeated and negative indices', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for vi, view in ipairs(CS.VIEWS) do
        local c, g = CS.pair(dtype, 10 * di + vi, view[2])
        for dim = 0, c:dim() - 1 do
          local n = c:size(dim)
          local ci, gi = index_pair { 0, n - 1, -1, 1, 1, -n, math.floor(n / 2) }
          CS.check('index_select', g:index_select(dim, gi), c:index_select(dim, ci), { exact = true })
          local ci2, gi2 = random_indices({ 3 * n }, 0, n, di + vi)
          CS.check('index_select', g:index_select(dim, gi2:slice(0, 0, nil, 2)),
            c:index_select(dim, ci2:slice(0, 0, nil, 2)), { exact = true })
        end
      end
    end
    local c0 = T.tensor(4.5)
    CS.check('index_select (0-d)', c0:cuda():index_select(0, T.tensor({ 0 }, { dtype = 'int64', device = 'cuda' })),
      c0:index_select(0, T.tensor({ 0 }, { dtype = 'int64' })), { exact = true })
  end)

  CS.it('gather along each dim with an index smaller than the input', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for vi, view in ipairs(CS.VIEWS) do
        local c, g = CS.pair(dtype, 100 + 10 * di + vi, view[2])
        for dim = 0, c:dim() == 2 and 1 or -1 do -- 2-d views
          local shape = { math.max(1, c:size(0) - 1), math.max(1, c:size(1) - 2) }
          shape[dim + 1] = c:size(dim) + 3
          local ci, gi = random_indices(shape, 0, c:size(dim), 7 * di + vi)
          CS.check('gather', g:gather(dim, gi), c:gather(dim, ci), { exact = true })
          CS.check('gather (transposed index)', g:gather(dim, gi:t():contiguous():t()), c:gather(dim, ci), { exact = true })
        end
      end
    end
  end)

  CS.it('scatter_ replaces with the last write in row-major order winning', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for dim = 0, 1 do
        local shape = { 6, 9 }
        shape[dim + 1] = 40 -- many writes per line: plenty of duplicates
        local ci, gi = random_indices(shape, 0, dim == 0 and 8 or 12, 31 * di + dim)
        local src_c, src_g = CS.pair(dtype, 200 + di, nil, { 40, 40 })
        local c, g = CS.pair(dtype, 300 + di)
        c, g = c:clone(), g:clone()
        c:scatter_(dim, ci, src_c)
        g:scatter_(dim, gi, src_g)
        CS.check('scatter_', g, c, { exact = true })
        -- a transposed destination (the runtime writes a contiguous copy back) and a scalar source
        local ct, gt = CS.pair(dtype, 400 + di, CS.VIEWS[2][2])
        ct, gt = ct:clone():t(), gt:clone():t()
        local ci2, gi2 = random_indices({ 5, 4 }, 0, 8, di)
        CS.check('scatter (scalar src)', gt:scatter(0, gi2, 1), ct:scatter(0, ci2, 1), { exact = true })
      end
    end
  end)

  CS.it('scatter_add_ adds duplicates in the cpu order, bit for bit', function()
    for di, dtype in ipairs { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'uint8' } do
      for dim = 0, 1 do
        local shape = { 7, 11 }
        shape[dim + 1] = 300
        local ci, gi = random_indices(shape, 0, dim == 0 and 8 or 12, 13 * di + dim)
        local src_c, src_g = CS.pair(dtype, 500 + di, nil, { 300, 300 }, { specials = false })
        local c, g = CS.pair(dtype, 600 + di, nil, nil, { specials = false })
        c, g = c:clone(), g:clone()
        c:scatter_add_(dim, ci, src_c:slice(1 - dim, 0, shape[2 - dim]))
        g:scatter_add_(dim, gi, src_g:slice(1 - dim, 0, shape[2 - dim]))
        CS.check('scatter_add_', g, c, { exact = true })
      end
    end
    -- a single target receiving every write (one long run)
    local c = T.zeros(3)
    local src = T.rand({ 100000 }, { generator = T.Generator(3) })
    local idx = T.ones(100000, { dtype = 'int64' })
    local g = c:cuda()
    c:scatter_add_(0, idx, src)
    g:scatter_add_(0, idx:cuda(), src:cuda())
    CS.check('scatter_add_ (one target)', g, c, { exact = true })
  end)

  CS.it('masked_fill and masked_fill_ with broadcast masks through views', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for vi, view in ipairs(CS.VIEWS) do
        if view[1] ~= 'broadcast' then
          local c, g = CS.pair(dtype, 700 + 10 * di + vi, view[2])
          local mc = CS.base('float64', 800 + vi, { c:size(-1) }):gt(0) -- broadcast over the leading dims
          local mg = mc:cuda()
          for _, v in ipairs { 0, -1.5, 0 / 0, 7 } do
            CS.check('masked_fill', g:masked_fill(mg, v), c:masked_fill(mc, v), { exact = true })
          end
          local cc, gc = c:clone(), g:clone()
          local cv, gv = view[2](CS.base(dtype, 5)):clone(), view[2](CS.base(dtype, 5):cuda()):clone()
          cv:masked_fill_(cv:ne(0), 3)
          gv:masked_fill_(gv:ne(0), 3)
          CS.check('masked_fill_', gv, cv, { exact = true })
          CS.check('masked_select', gc:masked_select(mg), cc:masked_select(mc), { exact = true })
        end
      end
    end
  end)

  CS.it('nonzero in row-major order; -0.0 is zero and NaN is not', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for vi, view in ipairs(CS.VIEWS) do
        local c, g = CS.pair(dtype, 900 + 10 * di + vi, view[2])
        CS.check('nonzero', g:nonzero(), c:nonzero(), { exact = true, column = dtype })
      end
    end
    local big = (T.rand({ 300, 1000, 7 }, { generator = T.Generator(9) }) - 0.9):relu()
    CS.check('nonzero (large)', big:cuda():nonzero(), big:nonzero(), { exact = true, column = 'float32' })
    CS.check('nonzero (none)', T.zeros(4, 5, { device = 'cuda' }):nonzero(), T.zeros(4, 5):nonzero(), { exact = true, column = 'float32' })
    CS.check('nonzero (empty)', T.zeros(0, 5, { device = 'cuda' }):nonzero(), T.zeros(0, 5):nonzero(), { exact = true, column = 'float32' })
    CS.check('nonzero (0-d)', T.tensor(2, { device = 'cuda' }):nonzero(), T.tensor(2):nonzero(), { exact = true, column = 'float32' })
  end)

  CS.it('advanced indexing reads with broadcast indices, masks and slices', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      local c, g = CS.pair(dtype, 1000 + di, nil, { 6, 7, 5 })
      local ci, gi = random_indices({ 4, 1 }, -6, 6, di)
      local cj, gj = random_indices({ 3 }, 0, 7, di + 1)
      local ck, gk = random_indices({ 3 }, -5, 5, di + 2)
      CS.check('index', g[{ gi }], c[{ ci }], { exact = true })
      CS.check('index (broadcast pair)', g[{ gi, gj }], c[{ ci, cj }], { exact = true })
      CS.check('index (slice, index)', g[{ {}, gj }], c[{ {}, cj }], { exact = true })
      CS.check('index (three)', g[{ gi, gj, gk }], c[{ ci, cj, ck }], { exact = true })
      local cm = CS.base('float64', 1100 + di, { 6, 7 }):gt(0)
      CS.check('index (mask)', g[cm:cuda()], c[cm], { exact = true })
      CS.check('index (non-contiguous)', g:permute(2, 0, 1)[{ gk, {}, gj }], c:permute(2, 0, 1)[{ ck, {}, cj }], { exact = true })
    end
  end)

  CS.it('index_put_ replaces (last write wins) and accumulates duplicates like the cpu', function()
    for di, dtype in ipairs(CS.ALL_DTYPES) do
      for _, accumulate in ipairs { false, true } do
        if not (accumulate and dtype == 'bool') then
          local c, g = CS.pair(dtype, 1200 + di, nil, { 6, 7, 5 }, { specials = false })
          c, g = c:clone(), g:clone()
          local ci, gi = random_indices({ 40 }, 0, 6, 3 * di)
          local cj, gj = random_indices({ 40 }, 0, 7, 3 * di + 1)
          local vc, vg = CS.pair(dtype, 1300 + di, nil, { 40, 5 }, { specials = false })
          c:index_put_({ ci, cj }, vc, accumulate)
          g:index_put_({ gi, gj }, vg, accumulate)
          CS.check('index_put_' .. (accumulate and ' (accumulate)' or ''), g, c, { exact = true })
          -- broadcast values (one row for every position) and a mask index
          local row_c, row_g = CS.pair(dtype, 1400 + di, nil, { 5 }, { specials = false })
          c:index_put_({ ci }, row_c, accumulate)
          g:index_put_({ gi }, row_g, accumulate)
          CS.check('index_put_ (broadcast values)', g, c, { exact = true })
          local m = CS.base('float64', 1500 + di, { 6, 7 }):gt(0)
          c:index_put_({ m }, row_c, accumulate)
          g:index_put_({ m:cuda() }, row_g, accumulate)
          CS.check('index_put_ (mask)', g, c, { exact = true })
          -- a non-contiguous destination
          local ct, gt = c:transpose(0, 2), g:transpose(0, 2)
          local ck, gk = random_indices({ 30 }, 0, 5, di + 9)
          ct:index_put_({ ck }, CS.base(dtype, 3, { 7, 6 }, { specials = false }), accumulate)
          gt:index_put_({ gk }, CS.base(dtype, 3, { 7, 6 }, { specials = false }):cuda(), accumulate)
          CS.check('index_put_ (transposed)', g, c, { exact = true })
        end
      end
    end
  end)
end)

describe('cuda sorting matches the cpu', function()
  teardown(function() CS.report('sorting') end)

  CS.it('sort and argsort: NaN largest, stable ties, -0.0 == 0.0, every dim and view', function()
    for di, dtype in ipairs(CS.NUMERIC) do
      for vi, view in ipairs(CS.VIEWS) do
        -- few distinct values: ties everywhere
        local base = CS.base(dtype, 1600 + 10 * di + vi, nil, { lo = -3, hi = 3 })
        if dtype ~= 'int64' then base = base:round() end
        local c, g = view[2](base), view[2](base:cuda())
        for _, dim in ipairs { 0, 1, -1 } do
          for _, descending in ipairs { false, true } do
            local cv, ci = c:sort(dim, descending)
            local gv, gi = g:sort(dim, descending)
            CS.check('sort values', gv, cv, { exact = true })
            CS.check('sort indices', gi, ci, { exact = true, column = dtype })
          end
        end
      end
    end
  end)

  CS.it('topk of the largest and smallest, sorted; unsorted gives the same elements', function()
    for di, dtype in ipairs(CS.NUMERIC) do
      local base = CS.base(dtype, 1700 + di, { 9, 40 }, { lo = -5, hi = 5 })
      if dtype ~= 'int64' then base = base:round() end
      local c, g = base, base:cuda()
      for _, k in ipairs { 0, 1, 5, 40 } do
        for _, largest in ipairs { true, false } do
          local cv, ci = c:topk(k, -1, largest, true)
          local gv, gi = g:topk(k, -1, largest, true)
          CS.check('topk values', gv, cv, { exact = true })
          CS.check('topk indices', gi, ci, { exact = true, column = dtype })
          local uv = g:topk(k, -1, largest, false)
          CS.check('topk (unsorted)', (uv:sort(-1, largest)), (cv:sort(-1, largest)), { exact = true })
        end
      end
      local cv, ci = c:topk(3, 0)
      local gv, gi = g:topk(3, 0)
      CS.check('topk values (dim 0)', gv, cv, { exact = true })
      CS.check('topk indices (dim 0)', gi, ci, { exact = true, column = dtype })
    end
  end)

  CS.it('long rows, many rows and a single huge row', function()
    for _, shape in ipairs { { 1, 1000003 }, { 3000, 333 }, { 100000, 3 }, { 7, 65537 } } do
      for _, dtype in ipairs { 'float32', 'int64', 'float16' } do
        local c = dtype == 'int64' and T.randint(-50, 50, shape, { generator = T.Generator(2) })
          or (T.rand(shape, { generator = T.Generator(2) }) * 100):round():to(dtype)
        local cv, ci = c:sort(-1, true)
        local gv, gi = c:cuda():sort(-1, true)
        CS.check('sort values (large)', gv, cv, { exact = true })
        CS.check('sort indices (large)', gi, ci, { exact = true, column = dtype })
      end
    end
  end)
end)

-- Leaves a freed block of `bytes` filled with 77 in the allocator's cache, where the next request
-- of its size is likely to land: a mask byte the kernels skip then shows.
local function dirty_cache(bytes)
  if bytes > 0 then CS.poison(T.empty({ bytes }, { dtype = 'uint8', device = 'cuda' })):free() end
end

-- Makes a mask on both devices from the same generator state: make(generator, device) returns a
-- tensor. Checks bytes and the generators' advance.
local function check_masks(case, bytes, make)
  local states = { { seed = 0, offset = 0 }, { seed = 91, offset = 5 }, { seed = 123456789, offset = 1000003 } }
  for _, state in ipairs(states) do
    local gc, gg = T.Generator(0):set_state(state), T.Generator(0):set_state(state)
    local want = make(gc, 'cpu')
    dirty_cache(bytes)
    CS.check(case, make(gg, 'cuda'), want, { exact = true, column = 'uint8' })
    assert.equals(tostring(gc:get_state().offset), tostring(gg:get_state().offset), case .. ': generator offset')
  end
end

describe('cuda mask generators match the cpu', function()
  teardown(function() CS.report('mask generation') end)

  -- 66000 images of one group run past the kernel's block limit (65535), so blocks loop
  local GRIDS = { { 1, 2, 2 }, { 3, 4, 6 }, { 5, 14, 14 }, { 128, 16, 16 }, { 2, 32, 32 }, { 0, 4, 4 }, { 66000, 2, 2 } }

  CS.it('uniform and grid-wise sampling give the same bytes', function()
    for _, grid in ipairs(GRIDS) do
      local n, h, w = unpack(grid)
      for _, strategy in ipairs { 'uniform', 'grid' } do
        check_masks('mask ' .. strategy, n * h * w, function(g, device)
          return T.masks[strategy](n, h, w, { generator = g, device = device }).mask
        end)
      end
    end
  end)

  CS.it('random sampling gives the same bytes at every ratio, and from the same noise', function()
    for _, grid in ipairs(GRIDS) do
      local n, h, w = unpack(grid)
      for _, ratio in ipairs { 0, 0.3, 0.75, 1 } do
        check_masks('mask random', n * h * w, function(g, device)
          return T.masks.random(n, h, w, { ratio = ratio, generator = g, device = device }).mask
        end)
      end
    end
    for _, dtype in ipairs(CS.NUMERIC) do -- coarse noise has ties: the lower index stays first
      local noise = CS.rand(dtype, 2000, { 6, 20 }, 0, 3)
      if noise:is_floating_point() then noise = noise:floor() end
      CS.check('mask random (noise)', T.masks.random(6, 4, 5, { noise = noise:cuda(), ratio = 0.4 }).mask,
        T.masks.random(6, 4, 5, { noise = noise, ratio = 0.4 }).mask, { exact = true, column = dtype })
    end
  end)

  CS.it("SimMIM's block masks give the same bytes", function()
    for _, cfg in ipairs { { 192, 32, 4, 0.6 }, { 224, 32, 16, 0.75 }, { 96, 32, 8, 0 }, { 64, 16, 16, 1 } } do
      local input, mask_patch, model_patch, ratio = unpack(cfg)
      for _, n in ipairs { 0, 1, 33 } do
        check_masks('mask simmim', n * (input / model_patch) ^ 2, function(g, device)
          return T.masks.simmim(n, { input_size = input, mask_patch_size = mask_patch, model_patch_size = model_patch,
            ratio = ratio, generator = g, device = device }).mask
        end)
      end
    end
  end)

  CS.it('secondary masking of a GPU mask gives the same new_mask and vis_mask, on the GPU', function()
    for _, formula in ipairs { 'swin', 'vit' } do
      for _, grid in ipairs { { 3, 4, 6 }, { 16, 16, 16 } } do
        local n, h, w = unpack(grid)
        for _, field in ipairs { 'new_mask', 'vis_mask' } do
          check_masks('mask secondary (' .. formula .. ')', 0, function(g, device)
            return T.masks.uniform_masking(n, h, w, { formula = formula, generator = g, device = device })[field]
          end)
        end
      end
    end
  end)
end)

describe('cuda uniform_compact matches the cpu', function()
  teardown(function() CS.report('uniform compaction') end)

  CS.it('forward and backward with masks made on the host and moved to the device, or made there', function()
    for di, dtype in ipairs { 'float32', 'float64', 'float16', 'bfloat16', 'int64', 'uint8' } do
      for _, case in ipairs { { 2, 8, 8, 3, 2 }, { 3, 16, 16, 96, 2 }, { 1, 12, 12, 5, 3 }, { 2, 8, 8, 4, 1 } } do
        local n, h, w, ch, p = unpack(case)
        local m = T.masks.uniform(n, h / p, w / p, { generator = T.Generator(di) })
        assert.equals('cpu', m.mask.device) -- masks are made on the host by default
        local mg = m.mask:cuda()
        local x = CS.base(dtype, 1800 + di, { n, h, w, ch })
        local want = T.uniform_compact(x, m.mask, p)
        CS.check('uniform_compact', T.uniform_compact(x:cuda(), mg, p), want, { exact = true })
        local made = T.masks.uniform(n, h / p, w / p, { generator = T.Generator(di), device = 'cuda' }).mask
        CS.check('uniform_compact', T.uniform_compact(x:cuda(), made, p), want, { exact = true })
        if dtype == 'float32' or dtype == 'float64' then
          CS.check_grad('uniform_compact backward', function(t, mask) return T.uniform_compact(t, mask, p) end,
            { x, m.mask }, { exact = true, fixed = { [2] = true } })
        end
      end
    end
  end)
end)

describe('cuda indexing gradients match the cpu', function()
  teardown(function() CS.report('indexing gradients') end)

  CS.it('index_select, gather, scatter, index, index_put, masked_fill, sort and topk backward', function()
    for _, dtype in ipairs { 'float32', 'float64' } do
      local x = CS.base(dtype, 1900, { 6, 8 }, { specials = false })
      local ci = random_indices({ 10 }, 0, 6, 1)
      local cg = random_indices({ 9, 8 }, 0, 6, 2)
      local src = CS.base(dtype, 1901, { 9, 8 }, { specials = false })
      CS.check_grad('index_select backward', function(t, i) return t:index_select(0, i) end, { x, ci }, { fixed = { [2] = true } })
      CS.check_grad('gather backward', function(t, i) return t:gather(0, i) end, { x, cg }, { fixed = { [2] = true } })
      CS.check_grad('scatter backward', function(t, i, s) return t:scatter(0, i, s) end, { x, cg, src }, { fixed = { [2] = true } })
      CS.check_grad('scatter_add backward', function(t, i, s) return t:scatter_add(0, i, s) end, { x, cg, src }, { fixed = { [2] = true } })
      CS.check_grad('index backward', function(t, i) return t[{ i, {}, }] end, { x, ci }, { fixed = { [2] = true } })
      CS.check_grad('index_put backward', function(t, i, v) return t:index_put({ i }, v, true) end,
        { x, ci, CS.base(dtype, 1902, { 10, 8 }, { specials = false }) }, { fixed = { [2] = true } })
      local mask = CS.base('float64', 1903, { 6, 8 }):gt(0)
      CS.check_grad('masked_fill backward', function(t, m) return t:masked_fill(m, 0) end, { x, mask }, { fixed = { [2] = true } })
      CS.check_grad('masked_select backward', function(t, m) return t:masked_select(m) end, { x, mask }, { fixed = { [2] = true } })
      CS.check_grad('sort backward', function(t) return (t:sort(1)) end, { x })
      CS.check_grad('topk backward', function(t) return (t:topk(3, 0)) end, { x })
    end
  end)
end)
