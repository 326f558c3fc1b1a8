-- masks_spec.lua — mask generation (RS, GS, US, SimMIM), secondary masking, the text drawing, and
-- UM-MAE's compaction, against plain-Lua references, the Philox stream definition and the
-- reference files of ../shared/ref.
local T = require 'tessera'
local S = require 'support'
local core = require 'tessera.core'
local ffi, C = core.ffi, core.C

local values = S.values

-- Row i (1-based) of a [N, L] value list.
local function row(list, i, l)
  local out = {}
  for j = 1, l do out[j] = list[(i - 1) * l + j] end
  return out
end

local function sum(list)
  local s = 0
  for _, v in ipairs(list) do s = s + v end
  return s
end

local function gen(seed, offset)
  return T.Generator(seed):set_state { seed = seed, offset = offset or 0 }
end

-- Pearson's chi-square statistic of observed counts against equal expected counts.
local function chi_square(counts)
  local total, k = sum(counts), #counts
  local expected, stat = total / k, 0
  for _, c in ipairs(counts) do stat = stat + (c - expected) ^ 2 / expected end
  return stat
end

-- ---- the reference files -----------------------------------------------------------------------
local REF = S.REF

-- A minimal safetensors reader, used only when tessera.serialize (T.load) is not there.
local SAFETENSORS_DTYPES = { F32 = 'float32', I64 = 'int64', U8 = 'uint8' }
local function read_safetensors(path)
  local f = assert(io.open(path, 'rb'))
  local head = f:read(8)
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + head:byte(i) end
  local header, data = f:read(n), f:read('*a')
  f:close()
  local out = {}
  for name, body in header:gmatch('"([^"]+)":(%b{})') do
    local dtype, shape = body:match('"dtype":"(%w+)"'), body:match('"shape":%[([%d,]*)%]')
    local a, b = body:match('"data_offsets":%[(%d+),(%d+)%]')
    if dtype and SAFETENSORS_DTYPES[dtype] then
      local dims = {}
      for d in shape:gmatch('%d+') do dims[#dims + 1] = tonumber(d) end
      local arr, nd = core.shape_array(dims, 'read_safetensors')
      local bytes = data:sub(tonumber(a) + 1, tonumber(b))
      out[name] = core.wrap(C.ts_from_host(nd, arr, core.dtype(SAFETENSORS_DTYPES[dtype]), bytes, core.device()))
    end
  end
  return out
end

local ref_cache = {}
local function load_ref(name)
  local path = REF .. name .. '.safetensors'
  if ref_cache[name] == nil then
    local f = io.open(path, 'rb')
    if not f then
      ref_cache[name] = false
    else
      f:close()
      ref_cache[name] = T.load and (T.load(path)) or read_safetensors(path)
    end
  end
  return ref_cache[name] or nil
end

-- ---- uniform sampling ----------------------------------------------------------------------------
-- The kept position (0..3, = 2 dy + dx) of every group, image by image, or an error if a group
-- does not keep exactly one patch.
local function kept_positions(m, n, h, w)
  local v, out = values(m), {}
  for i = 0, n - 1 do
    for gy = 0, h / 2 - 1 do
      for gx = 0, w / 2 - 1 do
        local kept, count = nil, 0
        for d = 0, 3 do
          local p = (2 * gy + math.floor(d / 2)) * w + 2 * gx + d % 2
          if v[i * h * w + p + 1] == 0 then kept, count = d, count + 1 end
        end
        assert(count == 1, string.format('image %d group (%d, %d) keeps %d patches', i, gy, gx, count))
        out[#out + 1] = kept
      end
    end
  end
  return out
end

describe('masks.uniform (US)', function()
  it('keeps exactly one patch of every 2x2 group, for any batch and even grid', function()
    for _, c in ipairs { { 3, 8, 8 }, { 2, 4, 6 }, { 1, 2, 2 }, { 5, 14, 14 }, { 2, 2, 10 } } do
      local n, h, w = c[1], c[2], c[3]
      local m = T.masks.uniform(n, h, w, { generator = T.Generator(1) })
      assert.same({ n, h * w }, m.mask.shape)
      assert.equal('uint8', m.mask.dtype)
      assert.equal(n * h * w / 4, #kept_positions(m.mask, n, h, w))
      assert.equal(n * h * w * 3 / 4, m.mask:to('int64'):sum():item())
      assert.equal(3 * h * w / 4, m:num_removed())
      assert.equal('uniform', m.strategy)
      assert.equal(h, m.h)
      assert.equal(w, m.w)
    end
  end)

  it("draws each image's positions from the official pool of ceil(h*w/8) of each, lane by lane", function()
    local n, h, w = 3, 6, 8
    local m = T.masks.uniform(n, h, w, { generator = gen(77, 5) })
    local groups, per_position = h * w / 4, math.ceil(h * w / 8)
    local lanes = values(T.randint(0, 2 ^ 32, { n, groups }, { generator = gen(77, 5) }))
    local want = {}
    for i = 0, n - 1 do
      local left, remaining = { per_position, per_position, per_position, per_position }, 4 * per_position
      for g = 1, groups do
        local r, p = math.floor(lanes[i * groups + g] * remaining / 2 ^ 32), 1
        while r >= left[p] do r, p = r - left[p], p + 1 end
        left[p], remaining = left[p] - 1, remaining - 1
        want[#want + 1] = p - 1
      end
    end
    assert.same(want, kept_positions(m.mask, n, h, w))
  end)

  it('keeps nearly as many patches at each position in every image, as the official pool does', function()
    -- 8x8 patches: 16 groups drawn from a pool of 8 per position; a position's count per image has
    -- the hypergeometric variance 16 * 3/16 * 16/31 = 1.55 (independent draws would give 3.0)
    local n, h, w = 2000, 8, 8
    local kept = kept_positions(T.masks.uniform(n, h, w, { generator = T.Generator(99) }).mask, n, h, w)
    local sum, sum_sq = 0, 0
    for i = 0, n - 1 do
      local count = { 0, 0, 0, 0 }
      for g = 1, 16 do count[kept[i * 16 + g] + 1] = count[kept[i * 16 + g] + 1] + 1 end
      for p = 1, 4 do assert.is_true(count[p] <= 8, 'image ' .. i .. ' keeps more than the pool holds') end
      sum, sum_sq = sum + count[1], sum_sq + count[1] ^ 2
    end
    local mean = sum / n
    local variance = (sum_sq - n * mean ^ 2) / (n - 1)
    assert.is_true(math.abs(mean - 4) < 0.15, 'mean ' .. mean)
    assert.is_true(variance > 1.3 and variance < 1.8, 'variance ' .. variance)
  end)

  it("chooses every group's kept position uniformly (chi-square)", function()
    local n, h, w = 400, 4, 4
    local kept = kept_positions(T.masks.uniform(n, h, w, { generator = T.Generator(2024) }).mask, n, h, w)
    local overall, per_group = { 0, 0, 0, 0 }, {}
    for k = 1, 16 do per_group[k] = 0 end
    for i, d in ipairs(kept) do
      overall[d + 1] = overall[d + 1] + 1
      local g = (i - 1) % 4
      per_group[g * 4 + d + 1] = per_group[g * 4 + d + 1] + 1
    end
    assert.is_true(chi_square(overall) < 16.27, 'positions overall: chi2 = ' .. chi_square(overall)) -- 3 dof, p = 0.001
    assert.is_true(chi_square(per_group) < 37.70, 'group x position: chi2 = ' .. chi_square(per_group)) -- 15 dof
  end)

  it('is deterministic per generator state and differs between seeds', function()
    local a = T.masks.uniform(4, 8, 8, { generator = T.Generator(5) })
    local b = T.masks.uniform(4, 8, 8, { generator = T.Generator(5) })
    local c = T.masks.uniform(4, 8, 8, { generator = T.Generator(6) })
    assert.same(values(a.mask), values(b.mask))
    assert.are_not.same(values(a.mask), values(c.mask))
    T.manual_seed(11)
    local d = T.masks.uniform(4, 8, 8)
    T.manual_seed(11)
    assert.same(values(d.mask), values(T.masks.uniform(4, 8, 8).mask))
  end)

  it('advances the generator: consecutive batches differ', function()
    local g = T.Generator(3)
    local a, b = T.masks.uniform(2, 8, 8, { generator = g }), T.masks.uniform(2, 8, 8, { generator = g })
    assert.are_not.same(values(a.mask), values(b.mask))
    assert.equal(2 * (2 * 16 / 4), g:get_state().offset)
  end)

  it('handles empty batches and grids', function()
    assert.same({ 0, 64 }, T.masks.uniform(0, 8, 8).mask.shape)
    assert.same({ 2, 0 }, T.masks.uniform(2, 0, 4).mask.shape)
  end)

  it('rejects odd grids, other ratios and bad arguments', function()
    S.assert_error(function() T.masks.uniform(2, 7, 8) end, 'mask_generate(uniform)', '7 x 8', 'even')
    S.assert_error(function() T.masks.uniform(2, 8, 8, { ratio = 0.5 }) end, 'ratio is 0.75', '0.5')
    S.assert_error(function() T.masks.uniform(-1, 8, 8) end, 'masks.uniform', 'n must be a non-negative integer')
    S.assert_error(function() T.masks.uniform(2, 8, 8, { generator = 3 }) end, 'generator must be a T.Generator')
    S.assert_error(function() C.ts_mask_generate(9, 1, 2, 2, 0.75, nil, core.device('cpu')); core.raise() end,
      'unknown mask kind 9')
  end)
end)

describe('masks.grid (GS)', function()
  it('keeps the same position in every group of an image, drawn as randint(0, 4) per image', function()
    local n, h, w = 6, 8, 6
    local m = T.masks.grid(n, h, w, { generator = gen(9, 2) })
    local per_image = values(T.randint(0, 4, { n, 1 }, { generator = gen(9, 2) }))
    local kept, groups = kept_positions(m.mask, n, h, w), h * w / 4
    for i = 1, n do
      for g = 1, groups do assert.equal(per_image[i], kept[(i - 1) * groups + g]) end
    end
    assert.equal(n * h * w * 3 / 4, m.mask:to('int64'):sum():item())
    assert.equal('grid', m.strategy)
  end)

  it('rejects odd grids and other ratios', function()
    S.assert_error(function() T.masks.grid(1, 4, 5) end, 'mask_generate(grid)', 'even')
    S.assert_error(function() T.masks.grid(1, 4, 4, { ratio = 0.6 }) end, 'ratio is 0.75')
  end)
end)

describe('masks.random (RS)', function()
  -- plain-Lua MAE random_masking: the int(L * (1 - ratio)) smallest keys stay visible
  local function reference(keys, n, l, ratio)
    local keep, out = math.floor(l * (1 - ratio)), {}
    for i = 1, n do
      local r = row(keys, i, l)
      local order = {}
      for j = 1, l do order[j] = j end
      table.sort(order, function(a, b) if r[a] ~= r[b] then return r[a] < r[b] end return a < b end)
      local m = {}
      for j = 1, l do m[j] = 1 end
      for j = 1, keep do m[order[j]] = 0 end
      for j = 1, l do out[#out + 1] = m[j] end
    end
    return out
  end

  it('keeps the int(L * (1 - ratio)) patches with the smallest raw lanes of the stream', function()
    for _, c in ipairs { { 3, 4, 6, 0.75 }, { 2, 14, 14, 0.6 }, { 2, 3, 3, 0 }, { 2, 3, 3, 1 }, { 1, 7, 5, 0.9 } } do
      local n, h, w, ratio = c[1], c[2], c[3], c[4]
      local m = T.masks.random(n, h, w, { ratio = ratio, generator = gen(31, 3) })
      local keys = values(T.randint(0, 2 ^ 32, { n, h * w }, { generator = gen(31, 3) }))
      assert.same(reference(keys, n, h * w, ratio), values(m.mask))
      local removed = h * w - math.floor(h * w * (1 - ratio))
      assert.equal(n * removed, m.mask:to('int64'):sum():item())
    end
  end)

  it('selects every patch equally often over many draws (chi-square)', function()
    local n, l = 400, 16
    local v = values(T.masks.random(n, 4, 4, { generator = T.Generator(12) }).mask)
    local kept = {}
    for j = 1, l do kept[j] = 0 end
    for i = 1, n do
      for j = 1, l do kept[j] = kept[j] + (1 - v[(i - 1) * l + j]) end
    end
    assert.equal(n * 4, sum(kept))
    assert.is_true(chi_square(kept) < 37.70, 'chi2 = ' .. chi_square(kept)) -- 15 dof, p = 0.001
  end)

  it('is deterministic per seed, different across seeds', function()
    local a = values(T.masks.random(3, 8, 8, { generator = T.Generator(1) }).mask)
    assert.same(a, values(T.masks.random(3, 8, 8, { generator = T.Generator(1) }).mask))
    assert.are_not.same(a, values(T.masks.random(3, 8, 8, { generator = T.Generator(2) }).mask))
  end)

  it('makes a mask from given noise as MAE does', function()
    local noise = T.rand({ 3, 10 }, { generator = T.Generator(4), dtype = 'float64' })
    local m = T.masks.random(3, 2, 5, { noise = noise, ratio = 0.7 })
    assert.same(reference(values(noise), 3, 10, 0.7), values(m.mask))
  end)

  it('reproduces input.mask of mae_vit_tiny_rs from input.mask_noise', function()
    local ref = load_ref('mae_vit_tiny_rs')
    if not ref then return pending('reference files not found in ' .. REF) end
    local m = T.masks.random(2, 8, 8, { noise = ref['input.mask_noise'], ratio = 0.75 })
    assert.same(values(ref['input.mask']), values(m.mask))
  end)

  it('rejects bad ratios and noise', function()
    S.assert_error(function() T.masks.random(1, 4, 4, { ratio = 1.5 }) end, 'ratio must be in [0, 1]', '1.5')
    S.assert_error(function() T.masks.random(2, 2, 2, { noise = T.rand(2, 5) }) end, 'noise must be [2, 4]')
    S.assert_error(function() T.masks.random(1, 1, 2, { noise = T.tensor({ { 0, 0 / 0 } }) }) end, 'NaN')
  end)
end)

describe('masks.simmim', function()
  it('removes ceil(count * ratio) mask patches, each covering a block of model patches', function()
    local cases = {
      { n = 3, input_size = 192, mask_patch_size = 32, model_patch_size = 4, ratio = 0.6 },
      { n = 2, input_size = 64, mask_patch_size = 16, model_patch_size = 16, ratio = 0.75 },
      { n = 2, input_size = 96, mask_patch_size = 32, model_patch_size = 8, ratio = 0.5 },
    }
    for _, c in ipairs(cases) do
      local m = T.masks.simmim(c.n, { input_size = c.input_size, mask_patch_size = c.mask_patch_size,
        model_patch_size = c.model_patch_size, ratio = c.ratio, generator = T.Generator(8) })
      local r, s = c.input_size / c.mask_patch_size, c.mask_patch_size / c.model_patch_size
      local side = r * s
      assert.same({ c.n, side * side }, m.mask.shape)
      assert.equal(side, m.h)
      local v = values(m.mask)
      for i = 0, c.n - 1 do
        local removed = 0
        for y = 0, side - 1 do
          for x = 0, side - 1 do
            local val = v[i * side * side + y * side + x + 1]
            -- constant over each s x s block
            assert.equal(v[i * side * side + (y - y % s) * side + (x - x % s) + 1], val)
            removed = removed + val
          end
        end
        assert.equal(math.ceil(r * r * c.ratio) * s * s, removed)
      end
    end
  end)

  it('removes the first ceil(count * ratio) entries of randperm(count) (one image)', function()
    local m = T.masks.simmim(1, { input_size = 160, mask_patch_size = 32, model_patch_size = 32, ratio = 0.6,
      generator = gen(21, 4) })
    local perm = values(T.randperm(25, { generator = gen(21, 4) }))
    local expected = {}
    for j = 1, 25 do expected[j] = 0 end
    for j = 1, 15 do expected[perm[j] + 1] = 1 end
    assert.same(expected, values(m.mask))
  end)

  it('is deterministic per seed, different across seeds', function()
    local function draw(seed) return values(T.masks.simmim(2, { generator = T.Generator(seed) }).mask) end
    assert.same(draw(3), draw(3))
    assert.are_not.same(draw(3), draw(4))
  end)

  it('rejects sizes that do not divide', function()
    S.assert_error(function() T.masks.simmim(1, { input_size = 100, mask_patch_size = 32 }) end,
      'mask_simmim', 'input_size 100 is not a multiple of mask_patch_size 32')
    S.assert_error(function() T.masks.simmim(1, { mask_patch_size = 32, model_patch_size = 6 }) end,
      'mask_patch_size 32 is not a multiple of model_patch_size 6')
    S.assert_error(function() T.masks.simmim(1, { ratio = -0.1 }) end, 'ratio must be in [0, 1]')
  end)
end)

-- ---- secondary masking -----------------------------------------------------------------------------
describe('secondary masking', function()
  -- plain-Lua formulas of ../shared/ref/README.md
  local function swin_reference(mask, noise, n, l, ratio)
    local out = {}
    local v = l - sum(row(mask, 1, l))
    local keep = math.floor(v * (1 - ratio))
    for i = 1, n do
      local m, z = row(mask, i, l), row(noise, i, l)
      local order = {}
      for j = 1, l do order[j] = j end
      table.sort(order, function(a, b)
        local ka, kb = m[a] + z[a], m[b] + z[b]
        if ka ~= kb then return ka < kb end
        return a < b
      end)
      local nm = {}
      for j = 1, l do nm[j] = 1 end
      for j = 1, keep do nm[order[j]] = 0 end
      for j = 1, l do out[#out + 1] = nm[j] end
    end
    return out
  end

  local function vit_reference(mask, noise, n, l, ratio)
    local new, vis = {}, {}
    local v = l - sum(row(mask, 1, l))
    local keep = math.floor(v * (1 - ratio))
    for i = 1, n do
      local m, z = row(mask, i, l), row(noise, i, v)
      local p = {}
      for j = 1, v do p[j] = j - 1 end
      table.sort(p, function(a, b) if z[a + 1] ~= z[b + 1] then return z[a + 1] < z[b + 1] end return a < b end)
      local j = 0
      for k = 1, l do
        if m[k] == 1 then
          new[#new + 1] = 1
        else
          j = j + 1
          local replaced = p[j] >= keep and 1 or 0
          new[#new + 1], vis[#vis + 1] = replaced, replaced
        end
      end
    end
    return new, vis
  end

  it('swin formula: the K visible patches with the smallest noise stay (plain-Lua reference)', function()
    local us = T.masks.uniform(3, 8, 8, { generator = T.Generator(1) })
    local noise = T.rand({ 3, 64 }, { generator = T.Generator(2) })
    for _, ratio in ipairs { 0.25, 0.5, 0, 1 } do
      local m = T.masks.secondary(us, { ratio = ratio, noise = noise })
      local expected = swin_reference(values(us.mask), values(noise), 3, 64, ratio)
      assert.same(expected, values(m.new_mask))
      local replaced = m.new_mask:to('int64'):sum():item() - us.mask:to('int64'):sum():item()
      assert.equal(3 * (16 - math.floor(16 * (1 - ratio))), replaced)
      assert.equal(us.mask, m.mask)
      assert.same({ 3, 16 }, m.vis_mask.shape)
      assert.equal(replaced, m.vis_mask:to('int64'):sum():item())
    end
  end)

  it('vit formula: visible token j is replaced iff argsort(noise)[j] >= K (plain-Lua reference)', function()
    local us = T.masks.uniform(4, 6, 6, { generator = T.Generator(3) })
    local noise = T.rand({ 4, 9 }, { generator = T.Generator(4), dtype = 'float64' })
    for _, ratio in ipairs { 0.25, 0.6 } do
      local m = T.masks.secondary(us, { ratio = ratio, noise = noise, formula = 'vit' })
      local new, vis = vit_reference(values(us.mask), values(noise), 4, 36, ratio)
      assert.same(new, values(m.new_mask))
      assert.same(vis, values(m.vis_mask))
      assert.equal('vit', m.formula)
    end
  end)

  it('draws float32 uniform noise from the generator when none is given', function()
    local us = T.masks.uniform(2, 8, 8, { generator = T.Generator(5) })
    local drawn = T.masks.secondary(us, { generator = gen(6, 1) })
    local given = T.masks.secondary(us, { noise = T.rand({ 2, 64 }, { generator = gen(6, 1) }) })
    assert.same(values(given.new_mask), values(drawn.new_mask))
    local drawn_vit = T.masks.secondary(us, { formula = 'vit', generator = gen(6, 1) })
    local given_vit = T.masks.secondary(us, { formula = 'vit', noise = T.rand({ 2, 16 }, { generator = gen(6, 1) }) })
    assert.same(values(given_vit.new_mask), values(drawn_vit.new_mask))
  end)

  it('uniform_masking is US followed by secondary masking of 25% of the kept patches', function()
    local m = T.masks.uniform_masking(5, 8, 8, { generator = T.Generator(7) })
    assert.equal('uniform_masking', m.strategy)
    kept_positions(m.mask, 5, 8, 8)
    local nm, pm = values(m.new_mask), values(m.mask)
    for i = 1, 5 * 64 do assert.is_true(nm[i] >= pm[i]) end
    for i = 1, 5 do assert.equal(64 - 12, sum(row(nm, i, 64))) end
    local g = T.Generator(7)
    local us = T.masks.uniform(5, 8, 8, { generator = g })
    local again = T.masks.secondary(us, { generator = g })
    assert.same(nm, values(again.new_mask))
  end)

  it('accepts a plain mask tensor (square grid, or opts.h and opts.w)', function()
    local mask = T.tensor({ { 1, 0, 1, 0, 1, 0 }, { 0, 0, 1, 1, 1, 0 } }, { dtype = 'uint8' })
    local noise = T.tensor({ { 0.5, 0.1, 0.2, 0.3, 0.4, 0.9 }, { 0.3, 0.2, 0.1, 0.7, 0.6, 0.5 } })
    local m = T.masks.secondary(mask, { noise = noise, ratio = 0.3, h = 2, w = 3 }) -- K = int(3 * 0.7) = 2
    assert.same({ 1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1 }, values(m.new_mask))
    S.assert_error(function() T.masks.secondary(mask, { noise = noise }) end, 'not a square grid')
  end)

  it('reproduces input.new_mask of the UM-MAE Swin and PVT files (swin formula)', function()
    for _, name in ipairs { 'ummae_swin_tiny', 'ummae_pvt_tiny' } do
      local ref = load_ref(name)
      if not ref then return pending('reference files not found in ' .. REF) end
      local m = T.masks.secondary(ref['input.mask'], { noise = ref['input.noise'], ratio = 0.25 })
      assert.same(values(ref['input.new_mask']), values(m.new_mask))
    end
  end)

  it('reproduces input.new_mask and input.vis_mask of mae_vit_tiny_um (vit formula)', function()
    local ref = load_ref('mae_vit_tiny_um')
    if not ref then return pending('reference files not found in ' .. REF) end
    local m = T.masks.secondary(ref['input.mask'], { noise = ref['input.noise'], ratio = 0.25, formula = 'vit' })
    assert.same(values(ref['input.new_mask']), values(m.new_mask))
    assert.same(values(ref['input.vis_mask']), values(m.vis_mask))
  end)

  it('rejects unequal visible counts, bad noise and bad formulas', function()
    local uneven = T.tensor({ { 1, 0, 0, 0 }, { 1, 1, 0, 0 } }, { dtype = 'uint8' })
    S.assert_error(function() T.masks.secondary(uneven) end, 'same number of visible patches', 'image 0 has 3',
      'image 1 has 2')
    local us = T.masks.uniform(2, 4, 4)
    S.assert_error(function() T.masks.secondary(us, { noise = T.rand(2, 15) }) end, 'noise must be [2, 16]')
    S.assert_error(function() T.masks.secondary(us, { noise = T.rand(2, 16), formula = 'vit' }) end, 'noise must be [2, 4]')
    S.assert_error(function() T.masks.secondary(us, { noise = T.full({ 2, 16 }, 1.0) }) end, 'in [0, 1)', 'holds 1')
    S.assert_error(function() T.masks.secondary(us, { noise = T.zeros({ 2, 16 }, { dtype = 'int64' }) }) end,
      'noise must be floating point')
    S.assert_error(function() T.masks.secondary(us, { formula = 'resnet' }) end, "formula must be 'swin' or 'vit'")
    S.assert_error(function() T.masks.secondary(T.full({ 1, 4 }, 2, { dtype = 'uint8' })) end, 'must be 0 (visible) or 1')
    S.assert_error(function() T.masks.secondary(us, { ratio = 2 }) end, 'ratio must be in [0, 1]')
  end)
end)

describe('mask devices', function()
  it("makes masks on opts.device 'cpu', the default (the GPU's are in cuda_indexing_spec)", function()
    local function bytes(t) return table.concat(values(t), ',') end
    for _, make in ipairs {
      function(opts) return T.masks.uniform(3, 4, 6, opts).mask end,
      function(opts) return T.masks.grid(3, 4, 6, opts).mask end,
      function(opts) return T.masks.random(3, 4, 6, opts).mask end,
      function(opts) return T.masks.simmim(3, opts).mask end,
      function(opts) return T.masks.uniform_masking(3, 4, 6, opts).new_mask end,
    } do
      local default, placed = make { generator = gen(5) }, make { generator = gen(5), device = 'cpu' }
      assert.equals('cpu', default.device)
      assert.equals('cpu', placed.device)
      assert.equals(bytes(default), bytes(placed))
    end
  end)

  it('names the device it cannot use, and refuses noise with a device', function()
    S.assert_error(function() T.masks.uniform(2, 4, 4, { device = 'gpu' }) end, 'masks.uniform', 'unknown device gpu')
    S.assert_error(function() T.masks.simmim(2, { device = 7 }) end, 'masks.simmim', 'unknown device')
    S.assert_error(function() T.masks.random(1, 2, 2, { noise = T.zeros(1, 4), device = 'cpu' }) end, 'masks.random',
      "give noise or device, not both")
    if not T.cuda.is_available() then
      for _, make in ipairs { T.masks.uniform, T.masks.grid, T.masks.random } do
        local ok, err = pcall(make, 2, 4, 4, { device = 'cuda' })
        assert.is_false(ok)
        assert.truthy(tostring(err):find('cuda', 1, true), err)
      end
    end
  end)
end)

-- ---- drawing ---------------------------------------------------------------------------------------
describe('tostring(mask)', function()
  it('draws the reference masks of ummae_swin_tiny as its README does', function()
    local ref = load_ref('ummae_swin_tiny')
    if not ref then return pending('reference files not found in ' .. REF) end
    local m = T.masks.secondary(ref['input.mask'], { noise = ref['input.noise'] })
    local expected = table.concat({
      'sample 0    sample 1',
      '.#.###.#    #o####o#',
      '#####o##    ###.#.##',
      '#o#o#.#.    ####.##.',
      '########    .##.####',
      '##.##.##    #.#..##o',
      '.######.    ########',
      '##.#####    ###.##.#',
      'o###.##.    o###.###',
    }, '\n')
    local text = tostring(m)
    local header, body = text:match('^([^\n]*)\n(.*)$')
    assert.equal(expected, body)
    assert.truthy(header:find('48 of 64 removed', 1, true))
    assert.truthy(header:find('secondary 0.25', 1, true))
  end)

  it('lays out wide grids and counts the images it leaves out', function()
    local text = tostring(T.masks.random(10, 2, 12, { generator = T.Generator(1) }))
    local lines = {}
    for l in text:gmatch('[^\n]+') do lines[#lines + 1] = l end
    assert.equal(1 + 1 + 2 + 1, #lines)
    assert.equal('... and 2 more', lines[#lines])
    assert.equal(8 * 12 + 7 * 4, #lines[3])
  end)
end)

-- ---- compaction -------------------------------------------------------------------------------------
-- plain-Lua gather: out[n][gy*p+i][gx*p+j] = x[n][(2gy+dy)*p+i][(2gx+dx)*p+j] of the kept patch
local function compact_reference(x, mask, p)
  local xv, mv = x:totable(), values(mask)
  local n, h, w = #xv, #xv[1], #xv[1][1]
  local wp = w / p
  local out = {}
  for b = 1, n do
    out[b] = {}
    for oy = 0, h / 2 - 1 do
      out[b][oy + 1] = {}
      for ox = 0, w / 2 - 1 do
        local gy, gx, i, j = math.floor(oy / p), math.floor(ox / p), oy % p, ox % p
        for d = 0, 3 do
          local py, px = 2 * gy + math.floor(d / 2), 2 * gx + d % 2
          if mv[(b - 1) * (h / p) * wp + py * wp + px + 1] == 0 then
            out[b][oy + 1][ox + 1] = xv[b][py * p + i + 1][px * p + j + 1]
          end
        end
      end
    end
  end
  return out
end

-- A [1, H, W, 2] grid of (row, col) token coordinates.
local function position_grid(h, w, dtype)
  local rows = T.arange(h, { dtype = dtype }):view(1, h, 1, 1):expand(1, h, w, 1)
  local cols = T.arange(w, { dtype = dtype }):view(1, 1, w, 1):expand(1, h, w, 1)
  return T.cat({ rows, cols }, 3)
end

describe('uniform_compact', function()
  it('gathers the kept patch of every group (plain-Lua reference, several patch sizes)', function()
    for _, c in ipairs { { 2, 8, 8, 3, 2 }, { 3, 4, 12, 2, 1 }, { 1, 12, 8, 5, 2 }, { 2, 12, 12, 1, 3 } } do
      local n, h, w, ch, p = c[1], c[2], c[3], c[4], c[5]
      local x = S.rand_tensor({ n, h, w, ch }, 11)
      local m = T.masks.uniform(n, h / p, w / p, { generator = T.Generator(n + h) })
      local out = T.uniform_compact(x, m, p)
      assert.same({ n, h / 2, w / 2, ch }, out.shape)
      assert.same(compact_reference(x, m.mask, p), out:totable())
    end
  end)

  it('accepts non-contiguous inputs, bool masks and every dtype', function()
    local x = S.rand_tensor({ 2, 3, 8, 8 }, 5):permute(0, 2, 3, 1)  -- NCHW storage, NHWC view
    assert.is_false(x:is_contiguous())
    local m = T.masks.uniform(2, 4, 4, { generator = T.Generator(1) })
    local expected = compact_reference(x, m.mask, 2)
    assert.same(expected, T.masks.compact(x, m.mask:to('bool'), 2):totable())
    for _, dtype in ipairs { 'float32', 'float16', 'int64', 'uint8' } do
      local xd = (x * 100):to(dtype)
      local ref = compact_reference(xd:to('float64'), m.mask, 2)
      local out = T.uniform_compact(xd, m, 2)
      assert.equal(dtype, out.dtype)
      assert.same(ref, out:to('float64'):totable())
    end
  end)

  it('backward scatters the gradient into the kept patches, zeros elsewhere', function()
    local x = S.rand_tensor({ 2, 4, 4, 2 }, 3)
    x.requires_grad = true
    local m = T.masks.uniform(2, 2, 2, { generator = T.Generator(4) })
    local out = T.uniform_compact(x, m, 2)
    assert.equal('uniform_compact', out.grad_fn)
    local w = S.rand_tensor({ 2, 2, 2, 2 }, 9)
    ;(out * w):sum():backward()
    local g, wv, mv = x.grad:totable(), w:totable(), values(m.mask)
    for b = 1, 2 do
      for y = 0, 3 do
        for xx = 0, 3 do
          local patch = math.floor(y / 2) * 2 + math.floor(xx / 2)
          for c = 1, 2 do
            local expected = mv[(b - 1) * 4 + patch + 1] == 0 and wv[b][y % 2 + 1][xx % 2 + 1][c] or 0
            assert.equal(expected, g[b][y + 1][xx + 1][c])
          end
        end
      end
    end
  end)

  it('passes gradcheck', function()
    local m = T.masks.uniform(2, 4, 4, { generator = T.Generator(2) })
    local x = S.rand_tensor({ 2, 8, 8, 2 }, 6)
    x.requires_grad = true
    assert.is_true(T.gradcheck(function(a) return T.uniform_compact(a, m, 2) end, { x }, { name = 'uniform_compact' }))
    local xt = S.rand_tensor({ 3, 2, 4, 8 }, 8):permute(0, 2, 3, 1)
    xt.requires_grad = true
    local m1 = T.masks.uniform(3, 4, 8, { generator = T.Generator(3) })
    assert.is_true(T.gradcheck(function(a) return T.uniform_compact(a, m1, 1) end, { xt }, { name = 'uniform_compact' }))
  end)

  it('compacts a float position grid: (row, col) of each compact token', function()
    local m = T.masks.uniform(2, 4, 4, { generator = T.Generator(5) })
    local pos = T.uniform_compact(position_grid(8, 8, 'float32'):expand(2, 8, 8, 2), m, 2)
    local kept, pv = kept_positions(m.mask, 2, 4, 4), pos:totable()
    for b = 1, 2 do
      for oy = 0, 3 do
        for ox = 0, 3 do
          local gy, gx = math.floor(oy / 2), math.floor(ox / 2)
          local d = kept[(b - 1) * 4 + gy * 2 + gx + 1]
          local row = (2 * gy + math.floor(d / 2)) * 2 + oy % 2
          local col = (2 * gx + d % 2) * 2 + ox % 2
          assert.same({ row, col }, pv[b][oy + 1][ox + 1])
        end
      end
    end
  end)

  it('gives act.enc_in.pos_hw of ummae_swin_tiny from the token position grid and input.mask', function()
    local ref = load_ref('ummae_swin_tiny')
    if not ref then return pending('reference files not found in ' .. REF) end
    local grid = position_grid(32, 32, 'float32'):expand(2, 32, 32, 2)
    local pos = T.uniform_compact(grid, ref['input.mask'], 4)
    assert.same(values(ref['act.enc_in.pos_hw']), values(pos))
  end)

  it('gives act.enc_in.pos_embed of ummae_pvt_tiny from the fixed pos_embed', function()
    local ref = load_ref('ummae_pvt_tiny')
    if not ref then return pending('reference files not found in ' .. REF) end
    local grid = ref['pos_embed']:view(1, 32, 32, 16):expand(2, 32, 32, 16)
    local pe = T.uniform_compact(grid, ref['input.mask'], 4):reshape(2, 256, 16)
    assert.same(values(ref['act.enc_in.pos_embed']), values(pe))
  end)

  it('names the image and group that does not keep exactly one patch', function()
    local x = T.zeros(2, 4, 4, 1)
    -- image 0 keeps patches 0, 3, 9, 14 (one per group); image 1 also keeps patch 2, in group (0, 1)
    local mask = T.tensor({ { 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1 },
      { 0, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1 } }, { dtype = 'uint8' })
    assert.same({ 2, 2, 2, 1 }, T.uniform_compact(x, mask:narrow(0, 0, 1):expand(2, 16), 1).shape)
    S.assert_error(function() T.uniform_compact(x, mask, 1) end, 'uniform_compact', 'image 1, group (0, 1)',
      'has 2 visible patches', 'exactly one')
    S.assert_error(function() T.uniform_compact(x, T.ones({ 2, 16 }, { dtype = 'uint8' }), 1) end,
      'image 0, group (0, 0)', 'has 0 visible')
  end)

  it('rejects bad shapes, dtypes and patch sizes', function()
    local x = T.zeros(2, 8, 8, 3)
    local m = T.masks.uniform(2, 4, 4)
    S.assert_error(function() T.uniform_compact(T.zeros(2, 8, 8), m, 2) end, 'channels-last token grid [N, H, W, C]')
    S.assert_error(function() T.uniform_compact(x, m, 3) end, 'does not split into 2x2 groups', 'multiples of 6')
    S.assert_error(function() T.uniform_compact(x, m, 1) end, 'mask must be [2, 64]', '[2,16]')
    S.assert_error(function() T.uniform_compact(x, m.mask:to('float32'), 2) end, 'mask must be uint8 or bool')
    S.assert_error(function() T.uniform_compact(x, m, 0) end, 'patch_tokens must be positive')
    S.assert_error(function() T.uniform_compact(T.zeros(3, 8, 8, 3), m, 2) end, 'mask must be [3, 16]')
  end)
end)
